"""The built-in adapters: LoRA, DoRA, QLoRA (peft), GaLore and full fine-tuning."""

from vistune import hookimpl
from vistune.specs import Adapter


@hookimpl
def vistune_register_adapters(register):
    merge = "vistune.adapters.lora:merge_lora"
    register(Adapter("lora", apply="vistune.adapters.lora:apply_lora", merge=merge, requires=("peft",),
                     description="LoRA (peft) on the configured target modules"))  # fmt: skip
    register(Adapter("dora", apply="vistune.adapters.lora:apply_dora", merge=merge, requires=("peft",),
                     description="weight-decomposed LoRA (peft use_dora)"))  # fmt: skip
    register(Adapter("qlora", apply="vistune.adapters.lora:apply_qlora", merge=merge, requires=("peft", "bitsandbytes"),
                     requires_cuda=True, description="LoRA on a 4-bit NF4 base model (bitsandbytes)"))  # fmt: skip
    register(Adapter("full", apply="vistune.adapters.full:apply_full",
                     description="train all weights, minus the frozen parts the config names"))  # fmt: skip
    register(Adapter("galore", apply="vistune.adapters.galore:apply_galore", requires=("galore_torch",),
                     description="full-rank training with GaLore low-rank gradient projection"))  # fmt: skip
