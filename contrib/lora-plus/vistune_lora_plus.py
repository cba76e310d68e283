"""LoRA+ for vistune (Hayou et al. 2024, arXiv:2402.12354): LoRA whose B matrices learn faster.

LoRA+ trains the same adapter as LoRA, with one change in the optimizer: the B matrices
get the learning rate ``lr_ratio`` times that of the A matrices (the paper's lambda;
peft's ``loraplus_lr_ratio``).  So the adapter reuses vistune's LoRA ``apply`` and
options, declares one option of its own, and builds its optimizer with peft's
``create_loraplus_optimizer`` when the Trainer is created::

    adapter: lora-plus
    lora-plus:
      rank: 16
      lr_ratio: 16

Nothing heavy is imported here: peft is imported by the hook, when a run uses the adapter.
"""

from vistune import hookimpl
from vistune.adapters.options import LORA_OPTIONS
from vistune.options import option_values
from vistune.specs import Adapter, Option

NAME = "lora-plus"
OPTIONS = (
    *LORA_OPTIONS,
    # the paper and peft advise a ratio of at least 1; 16 is the paper's default for LLaMA fine-tuning
    Option("lr_ratio", "float", 16.0, "learning rate of the B matrices over that of the A matrices (LoRA+'s lambda)",
           minimum=1),  # fmt: skip
)


@hookimpl
def vistune_register_adapters(register):
    register(Adapter(
        NAME, apply="vistune.adapters.lora:apply_lora", merge="vistune.adapters.lora:merge_lora", requires=("peft",),
        # a peft adapter: RL trains an SFT adapter further under it, and disables it for the reference model;
        # one learning rate per matrix kind, so per-part learning rates cannot apply
        peft_adapter=True, part_learning_rates=False, options=OPTIONS,
        description="LoRA+ (Hayou et al. 2024): LoRA with the B matrices trained at lr_ratio times the learning rate",
    ))  # fmt: skip


@hookimpl
def vistune_trainer_created(trainer, config):
    """Give a LoRA+ run's Trainer peft's LoRA+ optimizer, of the optimizer class and settings the run asks for.

    The Trainer keeps an optimizer it already has, so its own is never built.
    """
    if config.adapter != NAME:
        return
    from peft.optimizers import create_loraplus_optimizer

    ratio = option_values(config, NAME, OPTIONS)["lr_ratio"]
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs.pop("lr", None)  # given as lr below: the A matrices' rate
    trainer.optimizer = create_loraplus_optimizer(
        trainer.model, optimizer_cls, lr=trainer.args.learning_rate, loraplus_lr_ratio=ratio,
        loraplus_weight_decay=trainer.args.weight_decay, **kwargs,
    )  # fmt: skip
