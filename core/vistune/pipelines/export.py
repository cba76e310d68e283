"""``vistune export``: fold a trained LoRA/DoRA adapter into its base model.

The result is a standalone Hugging Face directory (weights, config, generation config,
processor or tokenizer, chat template) that plain ``transformers`` loads without
vistune or peft.  Where the saved weight names differ from what other engines expect,
the hub layout is written instead (see :func:`hub_layout_renames`); transformers loads
both.

Which adapter and which base:

* ``model: <base>`` and ``adapter_path: <adapter>``; or
* ``model: <adapter directory>`` (what ``vistune sft`` wrote): the base is the
  ``base_model`` of its ``vistune_run.json``, else peft's ``base_model_name_or_path``.

The merged model is written to a temporary directory next to ``export_dir`` (default
``output_dir/merged``) and renamed into place at the end, so an interrupted export
never leaves a half-written model where loaders look.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import attrs

from vistune.errors import VistuneError
from vistune.models import RUN_FILE, read_run_file
from vistune.plan import Plan

ADAPTER_CONFIG = "adapter_config.json"


def resolve_dirs(plan: Plan) -> tuple[Path, Path]:
    """``(base model directory, adapter directory)`` for the plan."""
    config = plan.config
    model_dir = plan.model_dir
    if model_dir is None:
        raise VistuneError("export needs a model", hint="set model: to the base model or to the adapter directory")
    if config.adapter_path:
        adapter_dir = Path(config.adapter_path)
        base_dir = model_dir
        if (model_dir / ADAPTER_CONFIG).is_file():  # model names an adapter directory too: use its base
            base_dir = _base_of(model_dir)
    else:
        adapter_dir = model_dir
        base_dir = _base_of(model_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise VistuneError(f"{adapter_dir} has no {ADAPTER_CONFIG}, so it is not a peft adapter directory",
                           hint="point adapter_path at the directory `vistune sft` wrote with adapter: lora or dora")  # fmt: skip
    if not (base_dir / "config.json").is_file():
        raise VistuneError(
            f"the base model of {adapter_dir} is {base_dir}, which is not a model directory on this machine",
            hint="set model: to the local base model directory and adapter_path: to the adapter",
        )
    return base_dir, adapter_dir


def _base_of(adapter_dir: Path) -> Path:
    run = read_run_file(adapter_dir) or {}
    base = run.get("base_model")
    if not base:
        try:
            base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError) as exc:
            raise VistuneError(f"cannot read {adapter_dir / ADAPTER_CONFIG}: {exc}") from None
    if not base:
        raise VistuneError(f"{adapter_dir} does not say which base model it was trained on",
                           hint="set model: to the base model directory and adapter_path: to the adapter")  # fmt: skip
    base_dir = Path(base).expanduser()
    if not base_dir.is_absolute():
        base_dir = (adapter_dir / base_dir) if (adapter_dir / base_dir).is_dir() else base_dir
    return base_dir


def export_dir(plan: Plan) -> Path:
    config = plan.config
    return Path(config.export_dir) if config.export_dir else Path(config.output_dir) / "merged"


def run(plan: Plan) -> Path:
    """Merge the adapter into its base and save the standalone model; returns its directory."""
    from peft import PeftModel

    from vistune import loading
    from vistune.adapters.lora import merge_lora

    base_dir, adapter_dir = resolve_dirs(plan)
    final = export_dir(plan)
    if final.exists() and any(final.iterdir()):
        raise VistuneError(f"{final} already exists and is not empty",
                           hint="remove it, or set export_dir: to a new directory")  # fmt: skip
    if plan.quantization is not None:
        print(f"vistune: merging into the full-precision weights of {base_dir} (quantization "
              f"{plan.config.quantization} applies to training only)", flush=True)  # fmt: skip
    # the base loads unquantized: merging into 4-bit weights would round the adapter away
    base_plan = attrs.evolve(plan, model_dir=base_dir, quantization=None)
    model, processor = loading.load_model(base_plan, for_training=False)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = merge_lora(model)
    merged.eval()

    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        merged.save_pretrained(str(staging))
        if processor is not None:
            processor.save_pretrained(str(staging))
        renames = hub_layout_renames(merged)
        if renames:
            rename_saved_weights(staging, renames)
        _write_run_file(staging, plan, base_dir, adapter_dir)
        if final.exists():
            final.rmdir()  # empty, checked above
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"vistune: merged {adapter_dir} into {base_dir} -> {final}", flush=True)
    return final


def _write_run_file(directory: Path, plan: Plan, base_dir: Path, adapter_dir: Path) -> None:
    from vistune import __version__

    trained = read_run_file(adapter_dir) or {}
    run = {
        "vistune_version": __version__,
        "model_type": plan.model_type.name if plan.model_type else trained.get("model_type"),
        "template": trained.get("template"),
        "adapter": None,  # merged: a standalone model
        "base_model": None,
        "merged_from": {"base_model": str(base_dir.resolve()), "adapter": str(adapter_dir.resolve())},
    }
    (directory / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")


# -- weight layout --------------------------------------------------------------------

#: Vision towers that transformers 5 keeps without their ``vision_model`` wrapper, while
#: the hub checkpoints (and vLLM's loaders) have ``vision_tower.vision_model.*`` names.
_UNWRAPPED_VISION_TOWERS = ("CLIPVisionModel", "SiglipVisionModel")


def hub_layout_renames(model: Any) -> list[tuple[re.Pattern, str]]:
    """Key renames that turn transformers 5's saved names into the hub checkpoints' layout.

    Llava-1.5 (and other CLIP/SigLIP-tower models) save ``vision_tower.embeddings.*``
    with transformers 5, but the hub checkpoints, transformers 4 and vLLM use
    ``vision_tower.vision_model.embeddings.*``.  transformers 5 maps the hub names back
    when loading, so writing them keeps the export loadable everywhere.
    """
    tower = getattr(getattr(model, "model", model), "vision_tower", None)
    if tower is None or type(tower).__name__ not in _UNWRAPPED_VISION_TOWERS or hasattr(tower, "vision_model"):
        return []
    return [(re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)"), r"\1vision_model.")]


def rename_saved_weights(directory: Path, renames: list[tuple[re.Pattern, str]]) -> None:
    """Rewrite the safetensors files (and their index) of a saved model with renamed keys."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def rename(key: str) -> str:
        for pattern, replacement in renames:
            key = pattern.sub(replacement, key)
        return key

    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
        rewritten = path.with_name(path.name + ".renamed")
        save_file(tensors, str(rewritten), metadata={**metadata, "format": "pt"})
        os.replace(rewritten, path)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data.get("weight_map", {}).items()}
        index.write_text(json.dumps(data, indent=2) + "\n")
