"""``max_batch_size: auto``: how many rows the ``transformers`` engine decodes together.

The engine keeps its running rows' keys and values in slots of equal capacity
(:mod:`vistune.inference.slot_cache`): every slot holds as many columns as the longest
request admitted needs.  So ``auto`` sizes the batch from the memory the model leaves free
and what one row's cache may grow to::

    kv_per_token = 2 (keys and values) * num_hidden_layers * num_key_value_heads * head_dim * dtype_bytes
    row_tokens   = min(max_model_len, ROW_TOKENS)
    budget       = gpu_memory_utilization * total - used - prefill_headroom
    rows         = clamp(budget // (kv_per_token * row_tokens), 1, 256)

``used`` is what the device holds once the model is loaded (``total - free``, where free
memory counts PyTorch's cached but unused blocks, which it hands out again), so
``gpu_memory_utilization`` (0.9 by default) is the share of the whole card the engine may
fill, as vLLM and SGLang read it; the rest is left for what the formula does not count
(the vision tower's activations, the allocator's fragmentation).  ``prefill_headroom``
keeps room for the activations of one prefill of ``prefill_tokens`` tokens
(:func:`prefill_bytes`).

Why ``ROW_TOKENS`` (4096) caps a row: long-context models accept 32k to 128k tokens,
and budgeting every row for all of them would cut the batch 8 to 32 times for requests
that never come near that, while a vision-language request (an image's few hundred to
two thousand tokens, a question, an answer of ``max_new_tokens``) rarely passes 4096.
A batch whose rows do pass it takes more memory than budgeted; if that runs out, the
engine fails the requests of that step and keeps serving, and an explicit
``max_batch_size`` is the setting for such workloads.

Without CUDA ``auto`` is :data:`CPU_BATCH_SIZE` (8), the fixed default of earlier
versions, and so it is for a model whose config does not give the sizes above.  vLLM
and SGLang size their batches themselves: their backends pass an explicit number on and
leave ``auto`` to them.

:func:`auto_batch_size` is the formula, pure; :func:`resolve` reads the loaded model
and the device; :func:`batch_size_of` is the number the server's admission limit and the
infer pipeline's chunks go by.
"""

from __future__ import annotations

from typing import Any

AUTO = "auto"
#: ``auto`` where the model is not on a CUDA device.
CPU_BATCH_SIZE = 8
#: Fewest and most rows ``auto`` chooses; beyond 256 a decode step is compute-bound
#: and more rows only lengthen each step.
MIN_AUTO, MAX_AUTO = 1, 256
#: The longest row ``auto`` budgets KV cache for (see the module's docstring).
ROW_TOKENS = 4096
#: The batch size assumed for an engine that sizes its batches itself and does not say how
#: many rows it takes (SGLang with ``auto``, a plugin's engine without ``max_batch_size``).
ENGINE_CHOSEN = MAX_AUTO


def kv_bytes_per_token(text_config: Any, dtype_bytes: int) -> int | None:
    """Bytes of KV cache one token takes in every layer: ``2 * layers * kv_heads * head_dim * dtype_bytes``.

    ``num_key_value_heads`` is ``num_attention_heads`` where the config has none (no
    grouped-query attention); ``head_dim`` is ``hidden_size / num_attention_heads`` where
    the config has none.  ``None`` for a config that gives neither.
    """
    layers, heads = _positive(text_config, "num_hidden_layers"), _positive(text_config, "num_attention_heads")
    if layers is None or heads is None:
        return None
    kv_heads = _positive(text_config, "num_key_value_heads") or heads
    head_dim = _positive(text_config, "head_dim") or (_positive(text_config, "hidden_size") or 0) // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes or None


def prefill_bytes(text_config: Any, dtype_bytes: int, tokens: int) -> int:
    """Room for the activations of one prefill of ``tokens`` tokens, one layer at a time.

    A few copies of the hidden states (residual, normed input, attention output) and the
    MLP's gate, up and product: ``tokens * (4 * hidden_size + 3 * intermediate_size) *
    dtype_bytes``, with ``intermediate_size`` taken as ``4 * hidden_size`` where the config
    has none (and nothing for a config without ``hidden_size``).  The KV entries the
    prefill writes are budgeted as rows, not here.
    """
    hidden = _positive(text_config, "hidden_size") or 0
    intermediate = _positive(text_config, "intermediate_size") or 4 * hidden
    return tokens * (4 * hidden + 3 * intermediate) * dtype_bytes


def auto_batch_size(
    text_config: Any, *, dtype_bytes: int, max_model_len: int, memory: tuple[int, int] | None,
    utilization: float, prefill_tokens: int,
) -> int:  # fmt: skip
    """The rows ``max_batch_size: auto`` gives the ``transformers`` engine (formula in the module docstring).

    :param text_config: the language model's config (``model.config.get_text_config()``).
    :param dtype_bytes: bytes of one KV cache element (2 for bfloat16 and float16).
    :param max_model_len: the longest prompt plus completion the engine accepts.
    :param memory: ``(free, total)`` bytes of the model's CUDA device once the model is
        loaded, or ``None`` without CUDA (the answer is then :data:`CPU_BATCH_SIZE`, as
        for a config without the sizes of :func:`kv_bytes_per_token`).
    :param utilization: the share of ``total`` the engine may fill (``gpu_memory_utilization``).
    :param prefill_tokens: the most tokens one prefill takes (the engine's budget).
    """
    per_token = kv_bytes_per_token(text_config, dtype_bytes)
    if memory is None or per_token is None:
        return CPU_BATCH_SIZE
    free, total = memory
    used = total - free
    budget = utilization * total - used - prefill_bytes(text_config, dtype_bytes, prefill_tokens)
    per_row = per_token * min(max_model_len, ROW_TOKENS)
    return max(MIN_AUTO, min(MAX_AUTO, int(budget // per_row)))


def resolve(setting: int | str, model: Any, *, max_model_len: int, utilization: float, prefill_tokens: int) -> int:
    """``max_batch_size`` for the ``transformers`` engine over ``model``: ``setting``, or the ``auto`` size.

    Call it once the model is loaded onto its device, so that what the weights take is
    no longer free.  The KV cache takes the dtype of the model's floating-point weights
    (the compute dtype of a quantized model).
    """
    if setting != AUTO:
        return int(setting)
    import torch

    parameters = list(model.parameters())
    device = parameters[0].device if parameters else torch.device("cpu")
    dtype = next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)
    from vistune.models import text_config

    return auto_batch_size(
        text_config(model.config), dtype_bytes=dtype.itemsize, max_model_len=max_model_len, memory=_cuda_memory(device),
        utilization=utilization, prefill_tokens=prefill_tokens,
    )


def batch_size_of(engine: Any, config: Any) -> int:
    """The rows ``engine`` decodes together, for limits sized by them (admission, infer chunks).

    An explicit ``max_batch_size`` is that number (the engine was started with it);
    ``auto`` is what the engine resolved it to (its ``max_batch_size``), or
    :data:`ENGINE_CHOSEN` for an engine that does not say.
    """
    if config.max_batch_size != AUTO:
        return int(config.max_batch_size)
    chosen = getattr(engine, "max_batch_size", None)
    return chosen if isinstance(chosen, int) and not isinstance(chosen, bool) and chosen >= 1 else ENGINE_CHOSEN


def _cuda_memory(device: Any) -> tuple[int, int] | None:
    """``(free, total)`` bytes of a CUDA ``device``; free counts PyTorch's cached but unused blocks."""
    import torch

    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached, total


def _positive(config: Any, name: str) -> int | None:
    """``config.name`` where it is a positive integer, else ``None``."""
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None
