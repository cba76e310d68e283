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
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, Any] = {}
        keys = list(dict.fromkeys(k for f in features for k in f))
        for key in keys:
            values = [f[key] for f in features if f.get(key) is not None]
            if not values:
                continue
            if self._is_token_sequence(key, features, lengths):
                pad = self.pad_token_id if key == "input_ids" else SEQUENCE_PAD.get(key, 0)
                batch[key] = self._pad_sequences([f[key] for f in features], length, pad)
            elif isinstance(values[0], torch.Tensor) or hasattr(values[0], "__array__"):
                batch[key] = pad_tensors(values)
            else:
                batch[key] = torch.as_tensor(values)
        if "attention_mask" not in batch:
            mask = torch.zeros((len(features), length), dtype=torch.long)
            for row, n in enumerate(lengths):
                mask[row, :n] = 1
            batch["attention_mask"] = mask
        return batch

    @staticmethod
    def _is_token_sequence(key: str, features: Sequence[dict[str, Any]], lengths: list[int]) -> bool:
        """A value with one entry per token of its sample (input_ids, labels, masks, token types)."""
        if key in ("input_ids", "labels", "attention_mask"):
            return True
        for feature, n in zip(features, lengths):
            value = feature.get(key)
            if value is None:
                return False
            if isinstance(value, list):
                if len(value) != n or (value and isinstance(value[0], list)):
                    return False
            elif getattr(value, "dim", lambda: 0)() != 1 or len(value) != n:
                return False
        return True

    @staticmethod
    def _pad_sequences(sequences: Sequence[Any], length: int, pad: int) -> Any:
        import torch

        out = torch.full((len(sequences), length), pad, dtype=torch.long)
        for row, seq in enumerate(sequences):
            seq = torch.as_tensor(seq, dtype=torch.long)
            out[row, : len(seq)] = seq
        return out
