"""Full fine-tuning: every weight trains except the parts the config freezes."""

from __future__ import annotations

from typing import Any

from vistune.adapters.lora import is_kbit
from vistune.adapters.targets import PARTS, frozen_parts, part_of
from vistune.errors import ConfigError


def set_trainable_parts(model: Any, model_type: Any, config: Any) -> dict[str, int]:
    """Set ``requires_grad`` by part (``freeze_vision_tower`` / ``_projector`` / ``_language_model``).

    :returns: the number of trainable parameters per part.
    """
    if is_kbit(model):
        raise ConfigError(
            f"adapter {config.adapter} updates the base weights, which cannot be trained in a quantized model",
            hint="set quantization: none, or use adapter: qlora to train LoRA on the quantized model",
        )
    frozen = set(frozen_parts(config))
    counts = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():
        part = part_of(name, model_type)
        trainable = part not in frozen
        param.requires_grad_(trainable)
        if trainable:
            counts[part] += param.numel()
    if not any(counts.values()):
        raise ConfigError(
            f"adapter {config.adapter} with freeze options {', '.join(f'freeze_{p}' for p in sorted(frozen))} "
            "leaves nothing to train",
            hint="set one of the freeze_* options to false",
        )
    return counts


def apply_full(model: Any, model_type: Any, config: Any) -> Any:
    """Make every weight of the unfrozen parts trainable; returns ``model`` itself."""
    set_trainable_parts(model, model_type, config)
    return model
