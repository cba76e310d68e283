"""Multimodal packing: several encoded samples per row, each attending only to itself.

A packed row is the concatenation of whole samples (never split) of at most
``max_packed_length`` tokens, with the images of its samples concatenated in order.
Isolation comes from the position ids alone: they restart at 0 for every sample, and
the batch carries no ``attention_mask``.  transformers (5.x) then derives the
per-sample block-diagonal causal mask from the position ids for every attention
kernel (``sdpa`` and ``eager`` get the mask, ``flex_attention`` a block mask,
``flash_attention_2`` variable-length sequences), as long as no KV cache is built;
:func:`pack_dataset` switches the model's ``use_cache`` off for that reason.  A sample's
images only ever meet that sample's tokens: the vision towers encode each image on its
own, and the image features fill the image tokens in order.

Per model family the positions differ:

* Llava, Llava-NeXT and text models: ``position_ids`` of shape (batch, length), 0..n-1
  per sample.
* Qwen2-VL / Qwen2.5-VL (models with ``get_rope_index``): ``position_ids`` of shape
  (4, batch, length), row 0 the text positions restarting per sample (what the mask is
  derived from), rows 1-3 each sample's own multimodal RoPE positions from the model's
  ``get_rope_index``.

Loss: the causal LM loss predicts token t+1 from position t, so the last token of a
sample would predict the first token of the next one.  The first label of every sample
is set to -100; a sample's first token is never a target when it is trained alone
either, so the packed loss equals the unpacked one.

Streaming, not pre-computed: rows are formed from a buffer of ``buffer_size`` samples
(first-fit-decreasing inside the buffer) while training reads them, so a 100k-sample
dataset is never encoded up front.  The price: packing is slightly less tight than
first-fit-decreasing over the whole dataset, and the number of rows per epoch is not
known in advance; ``len()`` is an estimate from a probe of the first samples (used
for the learning-rate schedule and progress), and an epoch ends when its samples run
out.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vistune.causal_lm import disable_cache
from vistune.data.collate import PAD_TO_MULTIPLE_OF, is_token_sequence, pad_sequences, pad_tensors, padded_length
from vistune.errors import DataError, VistuneError
from vistune.templates import IGNORE_INDEX

#: Token id that pads rows of a batch to the same length (its own segment, labels -100).
PAD_TOKEN_ID = 0
#: Keys the packer computes itself; an encoder's own values are dropped.
RECOMPUTED = ("attention_mask", "position_ids")
#: Keys with one entry per token.
TOKEN_KEYS = ("input_ids", "labels", "mm_token_type_ids", "token_type_ids")

PositionFn = Callable[[dict[str, Any]], Any]


# -- positions -------------------------------------------------------------------------


def _find_rope_index(model: Any) -> Callable | None:
    """The model's multimodal-RoPE position function (Qwen2-VL family), if it has one."""
    for module in model.modules():
        fn = getattr(module, "get_rope_index", None)
        if callable(fn):
            return fn
    return None


def _modality_token_ids(config: Any) -> dict[int, int]:
    """``{token id: modality}`` for image (1) and video (2) placeholders, as ``mm_token_type_ids`` counts them."""
    ids = {}
    for attr, kind in (("image_token_id", 1), ("image_token_index", 1), ("video_token_id", 2)):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            ids[value] = kind
    return ids


class MropePositions:
    """Per-sample multimodal RoPE positions, (3, length), from the model's own ``get_rope_index``."""

    def __init__(self, rope_index: Callable, modality_ids: dict[int, int]):
        self.rope_index = rope_index
        self.modality_ids = modality_ids
        self.parameters = set(inspect.signature(rope_index).parameters)

    def __call__(self, sample: dict[str, Any]):
        input_ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)[None]
        kwargs: dict[str, Any] = {}
        for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
            if key in self.parameters and sample.get(key) is not None:
                kwargs[key] = torch.as_tensor(sample[key])
        if "mm_token_type_ids" in self.parameters:
            types = sample.get("mm_token_type_ids")
            if types is None:
                types = torch.zeros_like(input_ids)
                for token_id, kind in self.modality_ids.items():
                    types[input_ids == token_id] = kind
            kwargs["mm_token_type_ids"] = torch.as_tensor(types).reshape(1, -1)
        if "image_grid_thw" not in kwargs and "video_grid_thw" not in kwargs:
            n = input_ids.shape[1]
            return torch.arange(n).expand(3, n).clone()
        with torch.no_grad():
            positions, _ = self.rope_index(input_ids, **kwargs)
        return positions[:, 0].to(torch.long)


def position_function(model: Any) -> PositionFn | None:
    """How a packed row gets its per-sample positions: ``None`` for plain 0..n-1, else an mrope function."""
    rope_index = _find_rope_index(model)
    if rope_index is None:
        return None
    return MropePositions(rope_index, _modality_token_ids(getattr(model, "config", None)))


# -- rows ------------------------------------------------------------------------------


def sample_length(sample: dict[str, Any]) -> int:
    return len(sample["input_ids"])


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= ``capacity`` (longest first, first bin that fits)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[index]
        for b, space in enumerate(free):
            if n <= space:
                bins[b].append(index)
                free[b] -= n
                break
        else:
            bins.append([index])
            free.append(capacity - n)
    return bins


def make_row(samples: Sequence[dict[str, Any]], positions: PositionFn | None = None) -> dict[str, Any]:
    """Concatenate encoded samples into one packed row.

    Token keys are concatenated; image tensors (``pixel_values``, ``image_sizes``,
    ``image_grid_thw``...) are concatenated along their first dimension in sample order;
    ``position_ids`` restart per sample (with mrope rows when ``positions`` is given);
    each sample's first label becomes -100.
    """
    token_parts: dict[str, list] = {}
    image_parts: dict[str, list] = {}
    pos_parts = []
    for sample in samples:
        n = sample_length(sample)
        for key, value in sample.items():
            if key in RECOMPUTED or value is None:
                continue
            if key in TOKEN_KEYS or is_token_sequence(value, n):
                tensor = torch.as_tensor(value, dtype=torch.long).reshape(-1)
                if key == "labels":
                    tensor = tensor.clone()
                    tensor[0] = IGNORE_INDEX  # never predicted from the previous sample's last token
                token_parts.setdefault(key, []).append(tensor)
            elif isinstance(value, torch.Tensor) or hasattr(value, "__array__"):
                image_parts.setdefault(key, []).append(torch.as_tensor(value))
        text = torch.arange(n, dtype=torch.long)
        pos_parts.append(text if positions is None else torch.cat([text[None], positions(sample)], dim=0))
    row: dict[str, Any] = {key: torch.cat(parts) for key, parts in token_parts.items()}
    row["position_ids"] = torch.cat(pos_parts, dim=-1)
    for key, parts in image_parts.items():
        row[key] = pad_tensors(parts)
    return row


def collate_packed(rows: Sequence[dict[str, Any]], pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF) -> dict[str, Any]:
    """Batch packed rows for the Trainer.

    Rows are padded to the longest (rounded up to ``pad_to_multiple_of``) with one more
    segment (token :data:`PAD_TOKEN_ID`, labels -100, positions 0..k-1) that nothing
    attends to.  The batch has no ``attention_mask``: the model derives the per-sample
    mask from ``position_ids`` ((batch, length), or (4, batch, length) for mrope models).
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    length = padded_length([len(row["input_ids"]) for row in rows], pad_to_multiple_of)
    batch: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for row in rows for k in row))
    for key in keys:
        values = [row[key] for row in rows if row.get(key) is not None]
        if key == "position_ids":
            batch[key] = _pad_positions(values, length)
        elif key in TOKEN_KEYS or all(is_token_sequence(row.get(key), len(row["input_ids"])) for row in rows):
            pad = {"input_ids": PAD_TOKEN_ID, "labels": IGNORE_INDEX}.get(key, 0)
            batch[key] = pad_sequences([row[key] for row in rows], length, pad)
        else:
            batch[key] = pad_tensors(values)
    return batch


def _pad_positions(values: Sequence[Any], length: int):
    padded = []
    for pos in values:
        pos = torch.as_tensor(pos, dtype=torch.long)
        extra = length - pos.shape[-1]
        if extra:
            tail = torch.arange(extra, dtype=torch.long).expand(*pos.shape[:-1], extra)
            pos = torch.cat([pos, tail], dim=-1)
        padded.append(pos)
    return torch.stack(padded, dim=-2)  # (batch, length) or (4, batch, length)


# -- the dataset -----------------------------------------------------------------------


def _describe(encoded: Any, index: int) -> str:
    source = getattr(encoded, "source", None)
    return f"sample {index} ({source(index)})" if callable(source) else f"sample {index}"


def _rows(items: Iterable[Any], length: Callable[[Any], int], capacity: int, buffer_size: int,
          rng: random.Random) -> Iterator[list[Any]]:  # fmt: skip
    """Group a stream of items into rows of total ``length`` at most ``capacity``, a buffer at a time.

    A full buffer is packed first-fit-decreasing; the emptiest row's items are held back
    to share a row with the next buffer's (rows stay full), the other rows come out in a
    shuffled order.  Each row keeps its items in stream order.
    """
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) < buffer_size:
            continue
        bins = first_fit_decreasing([length(x) for x in buffer], capacity)
        held: list[int] = []
        if len(bins) > 1:
            held = bins.pop(min(range(len(bins)), key=lambda b: sum(length(buffer[i]) for i in bins[b])))
        rng.shuffle(bins)
        yield from ([buffer[i] for i in sorted(b)] for b in bins)
        buffer = [buffer[i] for i in held]
    if buffer:
        bins = first_fit_decreasing([length(x) for x in buffer], capacity)
        rng.shuffle(bins)
        yield from ([buffer[i] for i in sorted(b)] for b in bins)


class PackedDataset(IterableDataset):
    """Packed rows of an encoded dataset, formed on the fly while training reads them.

    :param encoded: the encoded samples by index: a
        :class:`vistune.data.encoded.EncodedDataset`, read through its ``get`` so that
        dropped and bad samples are left out (its ``[]`` would stand the next sample in,
        which would then be packed twice), or a list (``None`` entries are left out).  An
        optional ``source(index) -> str`` names a sample in errors.
    :param max_packed_length: most tokens per row.
    :param positions: per-sample mrope positions (see :func:`position_function`).
    :param buffer_size: samples packed together; larger packs tighter and holds more
        encoded samples (with their pixels) in memory.
    :param shuffle: visit samples in a new seeded order every epoch (:meth:`set_epoch`).
    :param seed: base of the shuffle order (default: torch's initial seed, i.e. the run's seed).
    :param probe: samples encoded to estimate ``len()``.
    """

    def __init__(
        self,
        encoded: Any,
        max_packed_length: int,
        positions: PositionFn | None = None,
        *,
        buffer_size: int = 256,
        shuffle: bool = True,
        seed: int | None = None,
        probe: int = 128,
    ):
        if max_packed_length < 1:
            raise VistuneError(f"max_packed_length must be at least 1, got {max_packed_length}")
        self.encoded = encoded
        self.max_packed_length = max_packed_length
        self.positions = positions
        self.buffer_size = max(1, buffer_size)
        self.shuffle = shuffle
        self.seed = torch.initial_seed() % 2**32 if seed is None else seed
        self.probe = probe
        self.epoch = 0
        self._estimate: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        indices = list(range(len(self.encoded)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(indices)
        return indices

    def _checked(self, index: int) -> dict[str, Any] | None:
        """Sample ``index``, or ``None`` when it is left out; an error when it cannot fit in a row."""
        get = getattr(self.encoded, "get", None)
        sample = get(index) if callable(get) else self.encoded[index]
        if sample is None:
            return None
        n = sample_length(sample)
        if n > self.max_packed_length:
            raise DataError(
                f"{_describe(self.encoded, index)} has {n} tokens, more than max_packed_length "
                f"({self.max_packed_length}); packing never splits a sample",
                hint=f"raise max_packed_length to at least {n}, or lower max_length so that longer samples "
                "are refused (truncation: drop skips them)",
            )
        return sample

    def _samples(self, indices: Iterable[int]) -> Iterator[dict[str, Any]]:
        for index in indices:
            sample = self._checked(index)
            if sample is not None:
                yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = self.order(self.epoch)
        worker = get_worker_info()
        if worker is not None:
            order = order[worker.id :: worker.num_workers]
        rng = random.Random(self.seed * 7919 + self.epoch)
        rows = 0
        for samples in _rows(self._samples(order), sample_length, self.max_packed_length, self.buffer_size, rng):
            rows += 1
            yield make_row(samples, self.positions)
        if order and not rows and worker is None:
            # an empty epoch would leave the Trainer nothing to step on
            raise DataError(
                f"no sample of the dataset could be packed: all {len(order)} were dropped or bad",
                hint="raise max_length, or check the records",
            )

    def __len__(self) -> int:
        """Estimated rows per epoch: probe lengths, packed the way :meth:`__iter__` packs them."""
        if self._estimate is None:
            self._estimate = self._estimate_rows()
        return self._estimate

    def _estimate_rows(self) -> int:
        total = len(self.encoded)
        if total == 0:
            return 0
        probed = self.order(0)[: min(total, self.probe)]
        lengths = [sample_length(sample) for sample in self._samples(probed)]
        if not lengths:
            return 1
        n = int(round(total * len(lengths) / len(probed)))  # the samples an epoch keeps
        if n <= len(lengths) * 4:
            simulated = [lengths[i % len(lengths)] for i in range(n)]
        else:  # a bootstrap sample of the probe, as long as the epoch (capped: it is only an estimate)
            rng = random.Random(self.seed)
            simulated = [rng.choice(lengths) for _ in range(min(n, 20_000))]
        packed = _rows(simulated, lambda length: length, self.max_packed_length, self.buffer_size, random.Random(0))
        rows = sum(1 for _ in packed)
        return max(1, math.ceil(rows * n / len(simulated)))


def pack_dataset(
    encoded: Any, max_packed_length: int, model: Any, model_type: Any, *, packed_attention: bool = True, **options: Any
):
    """Pack an encoded dataset for ``model``: the SFT pipeline's entry point.

    Switches the model's KV cache off (packing needs it off, and training does not use
    it), checks that padding cannot be mistaken for an image token, switches an
    ``sdpa`` language model to :mod:`vistune.attention`'s per-sample flash attention
    (``packed_attention``; same numbers, without the work between samples), and returns a
    :class:`PackedDataset` whose rows :func:`collate_packed` batches.

    :param model: the loaded model (before or after the adapter is applied).
    :param model_type: its :class:`vistune.specs.ModelType`; must support packing.
    :param options: passed to :class:`PackedDataset` (``buffer_size``, ``shuffle``, ``seed``, ``probe``).
    """
    if model_type is not None and not model_type.supports_packing:
        raise VistuneError(f"model type {model_type.name} cannot isolate packed samples from each other",
                           hint="set packing: false")  # fmt: skip
    config = getattr(model, "config", None)
    if PAD_TOKEN_ID in _modality_token_ids(config) or PAD_TOKEN_ID in _modality_token_ids(
        getattr(config, "text_config", None)
    ):
        raise VistuneError(
            f"token id {PAD_TOKEN_ID} is this model's image token, so packed rows cannot be padded with it"
        )
    disable_cache(model)
    if packed_attention:
        from vistune.attention import use_packed_attention

        use_packed_attention(model)
    return PackedDataset(encoded, max_packed_length, position_function(model), **options)


def trainer_overrides() -> dict[str, Any]:
    """``TrainingArguments`` keywords a packed run needs (the SFT pipeline merges them in).

    Token counting counts every token: packed batches have no attention mask to tell
    padding apart, and hold almost none.  That each process keeps its batches whole
    (``dispatch_batches: False``) is set for every run by
    :func:`vistune.training.arguments.training_arguments`.
    """
    return {"include_num_input_tokens_seen": "all"}
