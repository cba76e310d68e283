"""The built-in adapters: LoRA, DoRA, QLoRA (peft), GaLore and full fine-tuning.

What makes each one special is said by its spec (a peft adapter, the quantization it
needs, the Trainer settings it changes, its options), so the pipelines treat a
third-party adapter that says the same exactly alike.
"""

from vistune import hookimpl
from vistune.adapters.options import GALORE_OPTIONS, LORA_OPTIONS
from vistune.specs import Adapter


@hookimpl
def vistune_register_adapters(register):
    lora = {"merge": "vistune.adapters.lora:merge_lora", "peft_adapter": True, "options": LORA_OPTIONS}
    register(Adapter("lora", apply="vistune.adapters.lora:apply_lora", requires=("peft",), **lora,
                     description="LoRA (peft) on the configured target modules"))  # fmt: skip
    register(Adapter("dora", apply="vistune.adapters.lora:apply_dora", requires=("peft",), **lora,
                     description="weight-decomposed LoRA (peft use_dora)"))  # fmt: skip
    register(Adapter("qlora", apply="vistune.adapters.lora:apply_qlora", requires=("peft", "bitsandbytes"),
                     requires_cuda=True, quantization_methods=("bnb-4bit",), **lora,
                     description="LoRA on a 4-bit NF4 base model (bitsandbytes)"))  # fmt: skip
    register(Adapter("full", apply="vistune.adapters.full:apply_full",
                     description="train all weights, minus the frozen parts the config names"))  # fmt: skip
    register(Adapter("galore", apply="vistune.adapters.galore:apply_galore", requires=("galore_torch",),
                     trainer_overrides="vistune.adapters.galore:trainer_overrides", part_learning_rates=False,
                     options=GALORE_OPTIONS,
                     description="full-rank training with GaLore low-rank gradient projection"))  # fmt: skip
