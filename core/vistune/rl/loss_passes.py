"""How many rollout groups one forward and backward pass of the policy loss takes.

A GRPO step trains on every completion it sampled: 8 prompts x 8 generations of a
~600-token prompt is 64 sequences and ~40k tokens in one forward.  Without gradient
checkpointing a 7B model keeps ~6 MB of activations per token for the backward pass,
far more than an 80-141 GB card holds, and the run dies with an out-of-memory error
after its first rollout.  The trainer therefore splits a micro-batch's groups into
passes that fit the GPU memory free after generation, and runs forward and backward
per pass.  The policy losses normalise over the whole micro-batch's counts
(:class:`vistune.rl.algorithm.PolicyBatch`), so the passes' gradients add up to the
gradient of one pass over everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Bytes of bf16 activations a decoder layer keeps per token for its backward pass, as
#: multiples of the hidden and intermediate sizes: attention's norm, q/k/v, output and
#: residual (~10 x hidden) and the MLP's gate, up, activation and down input (~5 x intermediate),
#: 2 bytes each.
HIDDEN_COPIES, INTERMEDIATE_COPIES, ACTIVATION_BYTES = 10, 5, 2
#: Bytes per completion token and vocabulary entry: fp32 logits, their log-softmax and its gradient.
LOGIT_BYTES = 12
#: Share of the free memory the passes plan to use (the allocator's fragmentation, the optimizer's step).
MEMORY_SHARE = 0.8


def pass_bytes_per_token(text_config: Any, checkpointing: bool) -> int:
    """Activation bytes one token of a pass keeps until the backward pass (checkpointing: each
    layer's input, plus one layer's activations while it is recomputed)."""
    hidden = int(getattr(text_config, "hidden_size", 0) or 0)
    intermediate = int(getattr(text_config, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(text_config, "num_hidden_layers", 0) or 1)
    layer = (HIDDEN_COPIES * hidden + INTERMEDIATE_COPIES * intermediate) * ACTIVATION_BYTES
    if checkpointing:
        return layers * hidden * ACTIVATION_BYTES + layer
    return layers * layer


def groups_per_pass(groups: Sequence[Any], *, text_config: Any, checkpointing: bool, free_bytes: int | None) -> int:
    """The most groups (of equal size) whose pass fits ``free_bytes``; all of them when the free
    memory is not known (a CPU run) or they fit; at least one."""
    if free_bytes is None or not groups:
        return max(len(groups), 1)
    prompt = max(len(group.encoded["input_ids"]) for group in groups)
    completion = max(len(ids) for group in groups for ids in group.completion_ids)
    size = max(group.size for group in groups)
    vocab = int(getattr(text_config, "vocab_size", 0) or 0)
    per_group = size * ((prompt + completion) * pass_bytes_per_token(text_config, checkpointing)
                        + completion * vocab * LOGIT_BYTES)  # fmt: skip
    fits = int(free_bytes * MEMORY_SHARE // max(per_group, 1))
    return min(max(fits, 1), len(groups))


def free_gpu_bytes(device: Any) -> int | None:
    """Bytes a CUDA ``device`` can still allocate (free on the card plus what the caching
    allocator holds unused); ``None`` elsewhere."""
    import torch

    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
