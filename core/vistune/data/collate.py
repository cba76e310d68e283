"""Batching encoded samples: pad token sequences, stack image tensors.

An encoder returns per sample ``input_ids`` and ``labels`` (lists of ints) and the
model's image inputs as tensors whose first dimension counts images or patches
(``pixel_values``, ``image_sizes``, ``image_grid_thw``).  A batch pads the sequences
on the right and concatenates the image tensors along dimension 0, so the batch holds
every image of every sample in sample order, which is the order the models consume
them in.  Image tensors whose other dimensions differ between samples (Llava-NeXT
samples with different patch counts) are zero-padded to the largest, the layout
the models' own processors produce for a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vistune.templates import IGNORE_INDEX

#: Batches are padded to a multiple of this many tokens: compiled blocks (``torch_compile``)
#: are specialised on the length's alignment and would otherwise recompile for unaligned
#: lengths; tensor cores prefer it too.
PAD_TO_MULTIPLE_OF = 8

#: Per-token sequences and the value that pads each; other per-token keys pad with 0.
SEQUENCE_PAD = {"labels": IGNORE_INDEX, "attention_mask": 0}


def pad_tensors(tensors: Sequence[Any]) -> Any:
    """Concatenate tensors along dim 0, zero-padding every other dimension to the largest."""
    import torch

    tensors = [torch.as_tensor(t) for t in tensors]
    if len({t.dim() for t in tensors}) != 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise ValueError(f"cannot batch image tensors with different numbers of dimensions: {shapes}")
    if tensors[0].dim() == 0:
        return torch.stack(tensors)
    trailing = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != trailing:
            out = t.new_zeros((t.shape[0], *trailing))
            out[(slice(None), *(slice(0, s) for s in t.shape[1:]))] = t
            t = out
        padded.append(t)
    return torch.cat(padded, dim=0)


def is_token_sequence(value: Any, length: int) -> bool:
    """Whether ``value`` has one entry per token of a ``length``-token sample: a flat list or a 1-D tensor."""
    if isinstance(value, list):
        return len(value) == length and not (value and isinstance(value[0], (list, tuple)))
    return callable(getattr(value, "dim", None)) and value.dim() == 1 and len(value) == length


def padded_length(lengths: Sequence[int], multiple: int | None) -> int:
    """The longest of ``lengths``, rounded up to a multiple of ``multiple`` (when given)."""
    length = max(lengths)
    if multiple:
        length = -(-length // multiple) * multiple
    return length


def pad_sequences(sequences: Sequence[Any], length: int, pad: int) -> Any:
    """A (len(sequences), length) long tensor: each sequence on the left, ``pad`` after it."""
    import torch

    out = torch.full((len(sequences), length), pad, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        sequence = torch.as_tensor(sequence, dtype=torch.long)
        out[row, : len(sequence)] = sequence
    return out


class Collator:
    """``collator(list_of_encoded_samples) -> batch dict of tensors``, for ``transformers.Trainer``.

    :param pad_token_id: id that pads ``input_ids`` (the tokenizer's pad token).
    :param pad_to_multiple_of: round the padded length up (8 helps tensor cores).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(f["input_ids"]) for f in features]
        length = padded_length(lengths, self.pad_to_multiple_of)
        batch: dict[str, Any] = {}
        keys = list(dict.fromkeys(k for f in features for k in f))
        for key in keys:
            values = [f[key] for f in features if f.get(key) is not None]
            if not values:
                continue
            if key in ("input_ids", "labels", "attention_mask") or all(
                is_token_sequence(f.get(key), n) for f, n in zip(features, lengths)
            ):
                pad = self.pad_token_id if key == "input_ids" else SEQUENCE_PAD.get(key, 0)
                batch[key] = pad_sequences([f[key] for f in features], length, pad)
            elif isinstance(values[0], torch.Tensor) or hasattr(values[0], "__array__"):
                batch[key] = pad_tensors(values)
            else:
                batch[key] = torch.as_tensor(values)
        if "attention_mask" not in batch:
            batch["attention_mask"] = pad_sequences([[1] * n for n in lengths], length, 0)
        return batch
