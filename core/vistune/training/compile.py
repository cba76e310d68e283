"""Regional compilation: ``torch.compile`` on each repeated transformer block.

Compiling the whole VLM breaks its graph at every data-dependent step (image token
scatter, packed-row masks) and recompiles on every new shape; compiling each decoder
block instead compiles one block's code once and reuses it for all layers.  Inductor
fuses the norms, rotary embedding, SiLU-gating, residual adds and LoRA's scale-and-add
into a few kernels, which is where an unfused step spends a good part of its time.
Opt-in (``torch_compile: true``): the first steps pay a compile of a minute or two,
and a GPU is required.
"""

from __future__ import annotations

from typing import Any


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
