"""The options of the built-in adapters, declared as any plugin declares its own.

Users set them in the adapter's section (``lora: {rank: 16}``, ``galore: {rank: 64}``);
the flat keys they had before (``lora_rank``, ``galore_rank``...) stay as aliases.
LoRA, DoRA and QLoRA share one set, and an adapter that reuses
:func:`vistune.adapters.lora.apply_lora` declares it too.  No torch here: the specs
that hold these are built when plugins load.
"""

from __future__ import annotations

from vistune.specs import Option

LORA_OPTIONS = (
    Option("rank", "int", 8, "LoRA rank r", minimum=1, alias="lora_rank"),
    Option("alpha", "int", 16, "LoRA alpha (the update is scaled by alpha / rank)", minimum=1, alias="lora_alpha"),
    Option("dropout", "float", 0.05, "dropout on the LoRA input", minimum=0, maximum=1, alias="lora_dropout"),
    Option("target_modules", "str_list", ["q_proj", "v_proj"], "module names to adapt, or all-linear",
           alias="lora_target_modules"),  # fmt: skip
    Option("scope", "str", "language_model",
           "where target modules are looked for: language_model, or all (vision tower and projector too)",
           choices=("language_model", "all"), alias="lora_scope"),  # fmt: skip
)

GALORE_OPTIONS = (
    Option("rank", "int", 128, "rank of the gradient projection", minimum=1, alias="galore_rank"),
    Option("update_proj_gap", "int", 200, "optimizer steps between projection updates", minimum=1,
           alias="galore_update_proj_gap"),  # fmt: skip
    Option("scale", "float", 0.25, "scale of the projected update", minimum=0, alias="galore_scale"),
)


def lora_options(config) -> dict:
    """The LoRA options of the run's adapter (its section, named ``config.adapter``, over the defaults)."""
    from vistune.options import option_values

    return option_values(config, config.adapter, LORA_OPTIONS)


def galore_options(config) -> dict:
    """The GaLore options of the run's adapter."""
    from vistune.options import option_values

    return option_values(config, config.adapter, GALORE_OPTIONS)
