"""Attention for packed rows that skips the work between samples.

transformers isolates packed samples with a dense block-diagonal mask under ``sdpa``:
correct, but every query still meets every key of the row, and a masked ``sdpa``
runs the slower memory-efficient kernel.  The attention registered here (name
:data:`NAME`) gives each sample its own variable-length segment to PyTorch's flash
kernel (``torch.nn.attention.varlen.varlen_attn``): for a 4096-token row of ~1000-token
samples that is about a quarter of the attention FLOPs, at flash speed.  Segments come
from the position ids (a new segment wherever they do not count up by one, exactly the
rule transformers uses for packed rows) and from the 2D padding mask.

Where the flash kernel cannot run (CPU, float32, attention dropout, a KV cache), the
same function builds the dense mask and calls ``sdpa``, so the numbers never depend
on the device.  Only the language model is switched (:func:`use_packed_attention`);
vision towers keep their own attention.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from vistune.models import text_config as text_config_of

NAME = "vistune_varlen"


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return varlen_attn


_VARLEN = _varlen_attn()
_VARLEN_GQA = _VARLEN is not None and "enable_gqa" in inspect.signature(_VARLEN).parameters


def _segment_starts(position_ids: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """(batch, length) bool: a token opens a new segment where positions do not count up by one."""
    starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if position_ids is not None:
        pos = position_ids.to(device)
        if pos.dim() == 1:
            pos = pos[None]
        pos = pos.expand(batch, -1)
        starts[:, 1:] |= pos[:, 1:] != pos[:, :-1] + 1
    return starts


class _Segments:
    """cu_seqlens of one forward pass, computed once and shared by every layer."""

    def __init__(self, position_ids, attention_mask, batch: int, length: int, device):
        starts = _segment_starts(position_ids, batch, length, device)
        self.keep = None
        if attention_mask is not None:
            valid = attention_mask.to(device=device, dtype=torch.bool)[:, -length:]
            if not bool(valid.all()):
                self.keep = valid.reshape(-1).nonzero().squeeze(1)
        ids = starts.reshape(-1).cumsum(0)
        if self.keep is not None:
            ids = ids[self.keep]
        _, counts = torch.unique_consecutive(ids, return_counts=True)
        self.cu_seqlens = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
        self.max_length = int(counts.max())


_last: tuple[Any, Any, tuple, _Segments] | None = None


def _segments(position_ids, attention_mask, batch, length, device) -> _Segments:
    """The segments of this forward pass (the same tensors reach every layer, so one computation serves all)."""
    global _last
    shape = (batch, length, device)
    if _last is not None and _last[0] is position_ids and _last[1] is attention_mask and _last[2] == shape:
        return _last[3]
    segments = _Segments(position_ids, attention_mask, batch, length, device)
    # Holding the tensors keeps their identity unique while they are the cache key; the shape
    # tells forward passes apart when neither tensor is given (both None).
    _last = (position_ids, attention_mask, shape, segments)
    return segments


def _dense_mask(attention_mask, position_ids, batch, q_len, kv_len, causal, device) -> torch.Tensor:
    """(batch, 1, q_len, kv_len) bool: causal, within a segment, on valid keys; every query sees itself."""
    offset = kv_len - q_len
    q_idx = torch.arange(q_len, device=device)[:, None] + offset
    k_idx = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_idx <= q_idx) if causal else torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    allowed = allowed[None].expand(batch, -1, -1)
    if q_len == kv_len:
        segment = _segment_starts(position_ids, batch, kv_len, device).cumsum(-1)
        allowed = allowed & (segment[:, :, None] == segment[:, None, :])
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, -kv_len:]
    allowed = allowed | (q_idx == k_idx)[None]  # a padding query with no valid key would give NaN
    return allowed[:, None]


def _varlen_applies(module: torch.nn.Module, query: torch.Tensor, kv_len: int, dropout: float) -> bool:
    """Whether PyTorch's flash varlen kernel can run this call: CUDA, half precision, no KV cache, no dropout.

    (The kernel has no CPU implementation: ``aten::_flash_attention_forward`` is CUDA-only.)
    """
    return (
        _VARLEN is not None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[2] == kv_len
        and not (module.training and dropout > 0)
    )


@torch.compiler.disable  # data-dependent segment lengths; compiled blocks call into it as one opaque op
def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: (batch, heads, len, dim) in, (batch, len, heads, dim) out."""
    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{NAME} attention expects a 2D padding mask, got shape {tuple(attention_mask.shape)}")
    if not _varlen_applies(module, query, kv_len, dropout):
        mask = _dense_mask(attention_mask, position_ids, batch, q_len, kv_len, causal, query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0,
                                             scale=scaling, enable_gqa=key.shape[1] != heads)  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    segments = _segments(position_ids, attention_mask, batch, q_len, query.device)
    kv_heads = key.shape[1]
    extra = {}
    if kv_heads != heads:
        if _VARLEN_GQA:
            extra["enable_gqa"] = True
        else:
            key = key.repeat_interleave(heads // kv_heads, dim=1)
            value = value.repeat_interleave(heads // kv_heads, dim=1)
            kv_heads = heads

    def tokens(x, n_heads):
        flat = x.transpose(1, 2).reshape(batch * q_len, n_heads, head_dim)
        return flat if segments.keep is None else flat.index_select(0, segments.keep)

    out = _VARLEN(
        tokens(query, heads),
        tokens(key, kv_heads),
        tokens(value, kv_heads),
        segments.cu_seqlens,
        segments.cu_seqlens,
        segments.max_length,
        segments.max_length,
        scale=scaling,
        window_size=(-1, 0) if causal else (-1, -1),
        **extra,
    )
    if segments.keep is not None:
        full = out.new_zeros(batch * q_len, heads, head_dim)
        out = full.index_copy(0, segments.keep, out)
    return out.reshape(batch, q_len, heads, head_dim), None


def padding_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0, mask_function=None,
    attention_mask: torch.Tensor | None = None, **kwargs: Any,
):  # fmt: skip
    """transformers' mask hook for :data:`NAME`: only the 2D padding mask (``None`` when nothing is padded)."""
    if (
        attention_mask is not None
        and attention_mask.shape[-1] >= kv_length
        and bool(attention_mask[:, -kv_length:].all())
    ):
        return None
    return attention_mask


def register() -> None:
    """Make :data:`NAME` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)


def use_packed_attention(model: Any) -> bool:
    """Switch the language model of ``model`` to :data:`NAME` if it uses ``sdpa``; returns whether it did.

    Only an ``sdpa`` language model is switched: ``eager`` was asked for explicitly, and
    ``flash_attention_2`` / ``flex_attention`` already skip the work between samples.
    """
    config = getattr(model, "config", None)
    if config is None:
        return False
    text_config = text_config_of(config)
    if getattr(text_config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    register()
    text_config._attn_implementation = NAME
    return True
