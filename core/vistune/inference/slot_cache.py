"""A preallocated KV cache with one slot per running row, written in place each decode step.

The engine's first layout (:mod:`vistune.inference.kv_batch`) keeps a ``DynamicCache``
whose rows end at the same column: every decode step concatenates one column onto every
layer (a copy of the whole cache), and every joining request pads and concatenates the
whole cache again.  Here each layer owns two buffers of ``(slots, kv_heads, capacity,
head_dim)`` allocated once; row ``i`` of the running batch lives in slot ``i`` from column
0, and a decode step writes each row's new key and value at its own column (one
``index_put_`` per layer) and attends to the first ``width`` columns under a mask that
hides each row's unused ones.  Shapes then depend only on the batch and width buckets
(:func:`bucket_rows`, :func:`bucket_width`), so a decode step can be captured once per
bucket as a CUDA graph (:mod:`vistune.inference.cuda_graphs`) and replayed without
Python's per-kernel launch cost.

Positions are a column plus a per-row offset: zero for ordinary models, the model's
``rope_deltas`` for Qwen-VL's multimodal rotary positions.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

#: Column granularity of the cache's capacity and of the attended width.
WIDTH_STEP = 256
#: Numbers every allocation of slot buffers, across batches: what a captured graph was recorded on.
_allocations = itertools.count(1)


def bucket_rows(rows: int) -> int:
    """The padded batch a decode step of ``rows`` rows runs at: 1, 2, 4, 8, then multiples of 8."""
    if rows <= 8:
        return 1 << max(rows - 1, 0).bit_length()
    return -(-rows // 8) * 8


def bucket_width(columns: int) -> int:
    """Columns a step attends to: ``columns`` rounded up to a multiple of :data:`WIDTH_STEP`."""
    return -(-columns // WIDTH_STEP) * WIDTH_STEP


class SlotCache:
    """Per-layer key and value buffers that the model's attention layers write into.

    The model calls :meth:`update` once per layer with the step's keys and values
    ``(rows, kv_heads, 1, head_dim)``; the cache writes them at ``columns`` and returns the
    first ``width`` columns of the first ``rows`` slots.  :meth:`begin_step` sets those three
    before each forward.  Built through :func:`make_slot_cache`, which makes it a
    ``transformers`` ``Cache`` so model code that checks the type accepts it.
    """

    def _init_slots(self, keys: list[Any], values: list[Any]) -> None:
        # Cache.__init__ is bypassed on purpose: its layer objects are what this class replaces.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self.keys, self.values = keys, values
        self._row_index: Any = None
        self._columns: Any = None
        self._rows = 0
        self._width = 0

    def begin_step(self, row_index: Any, columns: Any, width: int) -> None:
        """Rows ``row_index`` (slots ``0..rows-1``) write at ``columns``; attention reads ``width`` columns."""
        self._row_index, self._columns = row_index, columns
        self._rows, self._width = row_index.shape[0], width

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self._row_index, :, self._columns] = key_states[:, :, 0]
        values[self._row_index, :, self._columns] = value_states[:, :, 0]
        return keys[: self._rows, :, : self._width], values[: self._rows, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._width

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self._width, 0

    def __len__(self) -> int:
        return len(self.keys)


@functools.cache
def _slot_cache_class() -> type:
    from transformers.cache_utils import Cache

    return type("TransformersSlotCache", (SlotCache, Cache), {})


def make_slot_cache(keys: list[Any], values: list[Any]) -> SlotCache:
    """A :class:`SlotCache` over ``keys`` and ``values`` that is also a ``transformers`` ``Cache``."""
    cls = _slot_cache_class()
    cache = cls.__new__(cls)
    cache._init_slots(keys, values)
    return cache


class SlotBatch:
    """The running rows of the engine in a :class:`SlotCache`: row ``i`` in slot ``i``.

    ``lengths`` (host integers) are the columns each row has filled; ``offsets`` (a device
    buffer of one entry per slot, updated in place so captured graphs keep reading it) turn
    a column into a position.
    """

    def __init__(self, like: Any, slots: int):
        """Empty slots shaped after the layers of ``like``, a prefill's ``DynamicCache``."""
        import torch

        first = like.layers[0].keys
        self.num_layers = len(like.layers)
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.dtype, self.device = first.dtype, first.device
        self.slots = 0
        self.capacity = 0
        self.lengths: list[int] = []
        self.offsets = torch.zeros(0, dtype=torch.long, device=self.device)
        self.cache: SlotCache | None = None
        #: Changes whenever buffers are allocated (here or in another batch): graphs recorded on others are stale.
        self.generation = 0
        self.reserve(slots, 0)

    #: Rows may join at any step (the engine's admission asks this of every layout).
    mergeable = True

    @property
    def size(self) -> int:
        return len(self.lengths)

    def bytes_per_column(self) -> int:
        """Bytes one column takes in every slot and layer (keys and values)."""
        import torch

        item = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.slots * self.kv_heads * self.head_dim * item

    def reserve(self, slots: int, columns: int) -> None:
        """Grow the buffers to at least ``slots`` slots of ``columns`` columns (kept rows are copied)."""
        import torch

        slots = max(self.slots, bucket_rows(slots))
        capacity = max(self.capacity, bucket_width(max(columns, 1)))
        if slots == self.slots and capacity == self.capacity:
            return
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        old = self.cache
        buffers: dict[str, list[Any]] = {"keys": [], "values": []}
        for layer in range(self.num_layers):
            for name, grown in buffers.items():
                buffer = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if old is not None:
                    previous = getattr(old, name)
                    buffer[: self.size, :, : self.capacity].copy_(previous[layer][: self.size])
                    previous[layer] = None  # freed before the next layer is allocated
                grown.append(buffer)
        offsets = torch.zeros(slots, dtype=torch.long, device=self.device)
        offsets[: self.size].copy_(self.offsets[: self.size])
        self.cache, self.offsets = make_slot_cache(buffers["keys"], buffers["values"]), offsets
        self.slots, self.capacity = slots, capacity
        self.generation = next(_allocations)

    def absorb(self, cache: Any, attention_mask: Any, offsets: Any, needed: int) -> None:
        """Append the rows of a left-padded prefill (its ``DynamicCache``, mask and offsets).

        ``offsets`` are the prefill's (the next position of row ``r`` is the prefill's
        length plus ``offsets[r]``); ``needed`` is the most columns any row will fill.
        """
        import torch

        prompt = attention_mask.sum(dim=1).tolist()
        length = attention_mask.shape[1]
        first, rows = self.size, len(prompt)
        self.reserve(first + rows, max(needed, length))
        padding = torch.tensor([length - p for p in prompt], device=self.device)
        # Column j of slot r takes the prefill's column padding[r] + j: each row shifted left by
        # its padding (columns past its prompt repeat its last entry and stay masked).
        columns = (torch.arange(length, device=self.device) + padding.unsqueeze(1)).clamp(max=length - 1)
        index = columns[:, None, :, None].expand(rows, self.kv_heads, length, self.head_dim)
        for layer, source in enumerate(cache.layers):
            self.cache.keys[layer][first : first + rows, :, :length] = source.keys.gather(2, index)
            self.cache.values[layer][first : first + rows, :, :length] = source.values.gather(2, index)
        self.offsets[first : first + rows] = offsets.to(self.device) + padding
        self.lengths.extend(prompt)

    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (increasing), moved down to slots ``0..len(keep)-1``."""
        import torch

        moves = [(new, old) for new, old in enumerate(keep) if new != old]
        if moves:
            width = max(self.lengths[old] for _, old in moves)
            target = torch.tensor([new for new, _ in moves], device=self.device)
            source = torch.tensor([old for _, old in moves], device=self.device)
            for buffers in (self.cache.keys, self.cache.values):
                for buffer in buffers:
                    view = buffer[:, :, :width]
                    view.index_copy_(0, target, view.index_select(0, source))
            self.offsets.index_copy_(0, target, self.offsets.index_select(0, source))
        self.lengths = [self.lengths[old] for old in keep]

    def step_shape(self) -> tuple[int, int]:
        """``(rows, width)`` buckets of the next decode step."""
        return bucket_rows(self.size), bucket_width(max(self.lengths) + 1)

    def advance(self) -> None:
        """Every row filled one more column."""
        self.lengths = [n + 1 for n in self.lengths]
