"""Optimizer parameter groups with one learning rate per model part.

A model type names the module prefixes of its vision tower, projector and language
model; :func:`vistune.adapters.targets.part_of` finds each parameter's part by them,
through peft's and DDP's wrapper prefixes, so the same prefixes apply whatever the adapter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vistune.adapters.targets import part_of


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
