"""Regional compilation: ``torch.compile`` on each repeated transformer block.

Compiling the whole VLM breaks its graph at every data-dependent step (image token
scatter, packed-row masks) and recompiles on every new shape; compiling each decoder
block instead compiles one block's code once and reuses it for all layers.  Inductor
fuses the norms, rotary embedding, SiLU-gating, residual adds and LoRA's scale-and-add
into a few kernels, which is where an unfused step spends a good part of its time.

Why it is on by default on a GPU: a LoRA step of a 7B VLM launches thousands of small
kernels, and the Python that launches them (transformers, peft, autograd) takes longer
than the GPU takes to run them; a compiled block launches a few fused kernels from
lean generated code.  ``torch_compile: auto`` compiles when the run is long enough to
repay the first steps' compile (:data:`AUTO_MIN_STEPS`), on a GPU, in one process or
under DDP, and with the compiler's toolchain present; ``true`` and ``false`` decide
outright.
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import Any

#: Optimizer steps from which ``torch_compile: auto`` compiles.  Measured on one H200 with a
#: Llava-1.5-7B-shaped model (LoRA q,v, batch 4 x ~1k tokens): the first step takes 45-80 s
#: longer, later steps ~0.08-0.1 s less; about a thousand steps repay it.
AUTO_MIN_STEPS = 1000


def compile_decision(setting: Any, *, device: str, planned_steps: int | None, parallel_method: str,
                     quantized: bool = False) -> tuple[bool, str]:  # fmt: skip
    """``(compile?, why)`` for a ``torch_compile`` setting (true, false or ``"auto"``)."""
    if setting is not True and setting != "auto":
        return False, "torch_compile is false"
    if device != "cuda":
        return False, "training runs on the CPU (compiled blocks need a GPU)"
    if setting is True:
        return True, "torch_compile is true"
    if parallel_method == "fsdp":
        return False, "FSDP shards the blocks (set torch_compile: true to compile anyway)"
    if quantized:
        return False, "the base model is quantized (set torch_compile: true to compile its blocks anyway)"
    if importlib.util.find_spec("triton") is None or not (shutil.which("cc") or shutil.which("gcc")):
        return False, "triton or a C compiler is missing (torch.compile's GPU back end needs both)"
    if planned_steps is None or planned_steps < AUTO_MIN_STEPS:
        return False, f"{planned_steps or 'an unknown number of'} optimizer steps are planned, fewer than {AUTO_MIN_STEPS}"
    return True, f"{planned_steps} optimizer steps are planned"


def planned_steps(args: Any, train_dataset: Any, processes: int) -> int | None:
    """Optimizer steps the Trainer will run, from ``max_steps`` or the dataset's length and the epochs."""
    import math

    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    try:
        batches = math.ceil(len(train_dataset) / (args.per_device_train_batch_size * max(1, processes)))
    except TypeError:  # a dataset without a length
        return None
    return math.ceil(batches / args.gradient_accumulation_steps * args.num_train_epochs)


def repeated_blocks(model: Any) -> list[Any]:
    """The block modules to compile: instances of the model's ``_no_split_modules`` classes."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def compile_blocks(model: Any) -> int:
    """Compile each repeated block of ``model`` in place; returns how many were compiled."""
    blocks = repeated_blocks(model)
    for block in blocks:
        # Training batches change length every step (padding to the longest sample, packed
        # rows of different fill): compile for symbolic shapes once rather than per shape.
        block.compile(dynamic=True)
    return len(blocks)
