"""The rows a model decodes together, and how rows join and leave mid-generation.

Continuous batching needs one KV cache for rows that started at different times.  The
rows are kept left-aligned-by-padding: every row ends at the same column, padding
sits on the left and is masked out.  A joining group is padded on the left (or the
running rows are) so both end at the same column; leaving rows are dropped by index,
and padding columns that no row needs any more are cut off.

Positions are kept as an offset per row: the next token of row ``i`` sits at position
``length + offset[i]``.  For ordinary models the offset is minus the row's padding;
Qwen-VL's multimodal rotary positions add the model's ``rope_deltas``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Padding columns are only cut when at least this many are unused (each cut copies the cache).
MIN_TRIM = 16


def mergeable(cache: Any) -> bool:
    """Whether rows of this cache can be padded and concatenated (plain full-attention layers only)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.keys is not None for layer in layers)


def _pad_left(tensor: Any, columns: int, dim: int) -> Any:
    import torch

    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class RunningBatch:
    """KV cache, attention mask ``(rows, length)`` and position offsets ``(rows,)`` of the rows in flight."""

    def __init__(self, cache: Any, attention_mask: Any, offsets: Any):
        self.cache = cache
        self.attention_mask = attention_mask
        self.offsets = offsets
        #: Plain full-attention layers: rows may join, and unused padding may be cut.
        self.mergeable = mergeable(cache)

    @property
    def size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    def next_positions(self) -> Any:
        """``(rows, 1)`` positions of the tokens about to be fed."""
        return (self.offsets + self.length).unsqueeze(1)

    def grow(self) -> None:
        """Extend the mask by one attended column, for the token about to be fed."""
        import torch

        ones = self.attention_mask.new_ones((self.size, 1))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)

    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in this order), then cut padding no kept row needs."""
        import torch

        index = torch.tensor(list(rows), dtype=torch.long, device=self.attention_mask.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.offsets = self.offsets.index_select(0, index)
        self._trim()

    def _trim(self) -> None:
        if self.size == 0 or not self.mergeable:  # sliding-window layers keep their own length bookkeeping
            return
        used = self.attention_mask.any(dim=0)
        unused = int(used.long().argmax()) if bool(used.any()) else self.length
        if unused < MIN_TRIM:
            return
        for layer in self.cache.layers:
            layer.keys = layer.keys[..., unused:, :]
            layer.values = layer.values[..., unused:, :]
        self.attention_mask = self.attention_mask[:, unused:]
        self.offsets = self.offsets + unused

    def merge(self, other: RunningBatch) -> None:
        """Append ``other``'s rows after this batch's rows (both caches must be :func:`mergeable`)."""
        import torch

        length = max(self.length, other.length)
        mine, theirs = length - self.length, length - other.length
        for layer, other_layer in zip(self.cache.layers, other.cache.layers):
            layer.keys = torch.cat([_pad_left(layer.keys, mine, -2), _pad_left(other_layer.keys, theirs, -2)], dim=0)
            layer.values = torch.cat(
                [_pad_left(layer.values, mine, -2), _pad_left(other_layer.values, theirs, -2)], dim=0
            )
        self.attention_mask = torch.cat(
            [_pad_left(self.attention_mask, mine, 1), _pad_left(other.attention_mask, theirs, 1)]
        )
        self.offsets = torch.cat([self.offsets - mine, other.offsets - theirs])
