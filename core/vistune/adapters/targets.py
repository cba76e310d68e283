"""Which modules an adapter touches: model parts by name prefix, LoRA targets as a peft regex.

A model type names the module prefixes of its vision tower, projector and language
model (``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model``
and ``lm_head`` for Llava).  LoRA targets are looked for only inside the parts that
the adapter's ``scope`` option allows, so ``lora: {target_modules: [q_proj, v_proj]}``
adapts the language model's attention, not the CLIP tower's own ``q_proj``/``v_proj``,
unless ``scope: all`` says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from vistune.errors import ConfigError

PARTS = ("vision_tower", "projector", "language_model")

#: Output layers never adapted by ``all-linear`` (peft excludes them too): adapting the
#: vocabulary projection costs a lot of memory for little gain.
OUTPUT_LAYERS = ("lm_head", "embed_out", "output")

#: Name prefixes that wrappers add in front of the plain model's names: DDP's, peft's, torch.compile's.
WRAPPER_PREFIXES = ("module.", "base_model.model.", "_orig_mod.")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _strip_wrappers(name: str) -> str:
    unwrapped = None
    while unwrapped != name:  # wrappers nest (DDP around peft): strip until nothing changes
        unwrapped = name
        for prefix in WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
    return name


def part_of(name: str, model_type: Any, *, strict: bool = False) -> str | None:
    """The part that owns module or parameter ``name``, of the plain or a wrapped model.

    Wrapper prefixes (:data:`WRAPPER_PREFIXES`) are skipped, so the model type's prefixes
    apply whatever the adapter.  The longest matching prefix wins, so a projector nested
    inside the vision tower (Qwen2-VL's ``model.visual.merger`` inside ``model.visual``)
    counts as the projector.  Names under no prefix, and every name when there is no
    model type, belong to the language model; with ``strict`` they belong to no part
    when the model type names its language model's prefixes (LoRA targets are looked for
    only under a named prefix).
    """
    if model_type is None:
        return "language_model"
    name = _strip_wrappers(name)
    best, best_len = None, -1
    for part in PARTS:
        for prefix in getattr(model_type, part):
            if _under(name, prefix) and len(prefix) > best_len:
                best, best_len = part, len(prefix)
    if best is None and not (strict and model_type.language_model):
        best = "language_model"
    return best


def _linear_types() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    # quantized linears (QLoRA) are nn.Linear subclasses already; GPT-2's Conv1D is not
    return (torch.nn.Linear, Conv1D)


def _matches_target(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the full name, or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def lora_scope_parts(config: Any) -> tuple[str, ...]:
    """The parts LoRA may adapt: the language model, or everything with ``lora_scope: all``.

    A part trained in full (:func:`parts_trained_in_full`) is left out: peft cannot put
    an adapter on a module it also saves whole.
    """
    from vistune.adapters.options import lora_options

    parts = PARTS if lora_options(config)["scope"] == "all" else ("language_model",)
    full = parts_trained_in_full(config)
    return tuple(p for p in parts if p not in full)


def parts_trained_in_full(config: Any) -> tuple[str, ...]:
    """Parts a LoRA run trains whole, next to the adapter: those whose ``freeze_*`` is explicitly false.

    ``freeze_projector`` defaults to null ("the adapter decides": frozen under LoRA,
    trained under full and galore), so only ``freeze_projector: false`` asks for it;
    ``freeze_vision_tower`` defaults to true.  ``freeze_language_model`` does not apply:
    under LoRA the language model is what the adapter trains.
    """
    parts = []
    if config.freeze_vision_tower is False:
        parts.append("vision_tower")
    if config.freeze_projector is False:
        parts.append("projector")
    return tuple(parts)


def frozen_parts(config: Any) -> tuple[str, ...]:
    """Parts that full fine-tuning and GaLore keep frozen (``freeze_projector: null`` trains the projector)."""
    return tuple(part for part in PARTS if getattr(config, f"freeze_{part}"))


def lora_target_names(model: Any, model_type: Any, config: Any) -> list[str]:
    """Full names of the modules LoRA adapts, in model order.

    The adapter's ``target_modules`` option (flat key ``lora_target_modules``) is
    ``["all-linear"]`` (every linear layer in scope but the output layer) or module names
    matched the way peft matches them (``q_proj`` matches
    ``...self_attn.q_proj``).  A name that matches nothing in scope is an error naming it.
    """
    from vistune.adapters.options import lora_options

    options = lora_options(config)
    requested = list(options["target_modules"])
    label = f"{config.adapter}.target_modules"
    if not requested:
        raise ConfigError(f"{label} is empty", hint="name modules (e.g. [q_proj, v_proj]) or use all-linear")
    all_linear = any(t.replace("_", "-") == "all-linear" for t in requested)
    if all_linear and len(requested) > 1:
        raise ConfigError(
            f"{label} mixes all-linear with module names ({requested})",
            hint="use either [all-linear] or a list of module names",
        )
    parts = lora_scope_parts(config)
    linear = _linear_types()
    in_scope = [
        (name, module)
        for name, module in model.named_modules()
        if name and part_of(name, model_type, strict=True) in parts
    ]
    if all_linear:
        chosen = [
            name
            for name, module in in_scope
            if isinstance(module, linear) and name.rsplit(".", 1)[-1] not in OUTPUT_LAYERS
        ]
        if not chosen:
            raise ConfigError(f"{label}: all-linear found no linear layer in {', '.join(parts)}")
        return chosen
    chosen, unmatched = [], []
    for target in requested:
        hits = [name for name, _ in in_scope if _matches_target(name, target)]
        if not hits:
            unmatched.append(target)
        chosen.extend(hits)
    if unmatched:
        leaves = sorted({name.rsplit(".", 1)[-1] for name, module in in_scope if isinstance(module, linear)})
        raise ConfigError(
            f"{label}: {', '.join(map(repr, unmatched))} matches no module in the "
            f"{' / '.join(parts)} of this {model_type.name} model (scope: {options['scope']})",
            hint=f"linear layers there: {', '.join(leaves) or 'none'}; or use all-linear",
        )
    order = {name: i for i, (name, _) in enumerate(in_scope)}
    return sorted(set(chosen), key=order.__getitem__)


def target_regex(names: Iterable[str], all_names: Iterable[str]) -> str:
    """A peft ``target_modules`` regex (matched with ``re.fullmatch``) selecting exactly ``names``.

    Prefers the readable ``^(?:prefix)\\.(?:.*\\.)?(?:leaf1|leaf2)$`` form and falls back
    to listing every name when that form would also catch another module.
    """
    names = list(dict.fromkeys(names))
    all_names = list(all_names)
    wanted = set(names)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    roots = sorted({_common_root(n) for n in names})
    compact = r"^(?:" + "|".join(map(re.escape, roots)) + r")\.(?:.*\.)?(?:" + "|".join(map(re.escape, leaves)) + r")$"
    pattern = re.compile(compact)
    if {n for n in all_names if pattern.fullmatch(n)} == wanted:
        return compact
    return r"^(?:" + "|".join(map(re.escape, names)) + r")$"


def _common_root(name: str) -> str:
    """``model.language_model.layers.0.self_attn.q_proj`` -> ``model.language_model`` (the part's prefix level)."""
    pieces = name.split(".")
    for i, piece in enumerate(pieces):
        if piece.isdigit() or piece in ("layers", "h", "blocks", "encoder", "decoder"):
            return ".".join(pieces[:i]) or pieces[0]
    return ".".join(pieces[:-1]) or pieces[0]
