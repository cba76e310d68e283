"""Optimizer parameter groups with one learning rate per model part.

A model type names the module prefixes of its vision tower, projector and language
model (as in ``model.named_modules()`` of the plain transformers model).  Wrapped
models (peft's ``base_model.model.``, DDP's ``module.``) are unwrapped by name so the
same prefixes apply whatever the adapter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Name prefixes that wrappers add in front of the plain model's parameter names.
WRAPPER_PREFIXES = ("module.", "base_model.model.", "_orig_mod.")


def strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def part_of(name: str, model_type: Any) -> str:
    """``vision_tower``, ``projector`` or ``language_model`` (everything not named otherwise)."""
    from vistune.adapters.targets import part_of as plain_part_of

    return "language_model" if model_type is None else plain_part_of(strip_wrappers(name), model_type)


def part_learning_rates(config: Any) -> dict[str, float]:
    base = config.learning_rate
    return {
        "vision_tower": base if config.vision_tower_lr is None else config.vision_tower_lr,
        "projector": base if config.projector_lr is None else config.projector_lr,
        "language_model": base,
    }


def param_groups(
    model: Any, model_type: Any, learning_rates: dict[str, float], weight_decay: float, decay_names: Iterable[str]
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (part, decays); each group carries its ``lr`` and a ``name``.

    :param decay_names: parameter names that take weight decay (the Trainer's
        ``get_decay_parameter_names``: not biases or norms).
    """
    decay_names = set(decay_names)
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        groups.setdefault((part_of(name, model_type), name in decay_names), []).append(param)
    out = []
    # the language model's group first: the Trainer logs the first group's learning rate
    for part in ("language_model", "projector", "vision_tower"):
        for decays in (True, False):
            params = groups.get((part, decays))
            if params:
                out.append({
                    "params": params,
                    "lr": learning_rates[part],
                    "weight_decay": weight_decay if decays else 0.0,
                    "name": f"{part}{'' if decays else '.no_decay'}",
                })  # fmt: skip
    return out
