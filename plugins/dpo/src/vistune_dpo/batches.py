"""Preference records to training batches, through the model's own vistune template.

A pair is encoded as two conversations, prompt + chosen and prompt + rejected, by the
template's ``encode`` (the same as ``vistune sft``'s: token ids with the images'
placeholders expanded, labels on the answer and its end-of-turn token).  A batch of
``B`` pairs holds the ``2B`` sequences as one padded block, all chosen answers first,
then all rejected ones (one concatenated forward, as TRL does), and the image tensors
of the ``B`` pairs once: the trainer runs the vision tower once per pair and gives
both answers the same image features.  An unpaired batch (KTO) holds ``B`` answers and,
for the KL estimate, each prompt followed by the previous record's answer (TRL's
mismatched pairs), with the same images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vistune.data.collate import Collator
from vistune.data.encoded import EncodedDataset
from vistune.errors import DataError
from vistune.templates import IGNORE_INDEX, Sample
from vistune_dpo.layouts import ANSWERS

#: Encoder outputs that hold images (they travel once per pair).
IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")
#: Prefix of the KL sequences' keys in an unpaired batch (``kl_input_ids``, ``kl_labels``...).
KL_PREFIX = "kl_"


def with_answer(sample: Sample, answer: str) -> Sample:
    """The prompt of ``sample`` followed by ``answer`` as the assistant's turn."""
    return Sample([*sample.messages, {"role": "assistant", "content": answer}], sample.images, sample.columns,
                  sample.source)  # fmt: skip


def _text_only(encoded: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in encoded.items() if k not in IMAGE_KEYS}


def _check_answer(encoded: dict[str, Any], which: str, source: str) -> None:
    if not any(label != IGNORE_INDEX for label in encoded["labels"]):
        raise DataError(f"{source}: the {which} answer encodes to no trained token", hint="check the record's answer")


class PairEncoder:
    """``encode(sample)``: a preference record as a training item, or ``None`` when an answer is too long.

    The item is ``{"chosen", "rejected"}`` (paired) or ``{"answer", "label", "sample"}``
    (unpaired; the sample, with its images, builds the KL sequences).
    """

    def __init__(self, encoder: Any, *, paired: bool):
        self.encoder = encoder
        self.paired = paired

    def encode(self, sample: Sample) -> dict[str, Any] | None:
        answers = sample.columns[ANSWERS]
        if self.paired:
            chosen = self.encoder.encode(with_answer(sample, answers["chosen"]))
            rejected = self.encoder.encode(with_answer(sample, answers["rejected"]))
            if chosen is None or rejected is None:
                return None
            _check_answer(chosen, "chosen", sample.source)
            _check_answer(rejected, "rejected", sample.source)
            return {"chosen": chosen, "rejected": _text_only(rejected)}
        answer = self.encoder.encode(with_answer(sample, answers["completion"]))
        if answer is None:
            return None
        _check_answer(answer, "answer", sample.source)
        return {"answer": answer, "label": answers["label"], "sample": sample}


class PreferenceItems(EncodedDataset):
    """Map-style dataset of encoded preference items, read and encoded when a batch needs them.

    ``items[i]`` is ``{"index", "chosen", "rejected"}`` (paired) or ``{"index", "answer",
    "label", "sample"}`` (unpaired), ``index`` being the record's.  As in ``vistune sft``
    (:class:`vistune.data.encoded.EncodedDataset`), a pair the template drops
    (``truncation: drop``) or, with ``on_bad_record: skip``, a bad one is replaced by the
    next, and counted in :attr:`dropped` and :attr:`skipped` by whichever process met it,
    DataLoader workers included.
    """

    def __init__(self, records: Sequence[Sample], encoder: Any, *, paired: bool):
        super().__init__(records, PairEncoder(encoder, paired=paired))
        self.paired = paired

    def get(self, index: int) -> dict[str, Any] | None:
        item = super().get(index)
        return None if item is None else {"index": index, **item}

    def summary(self) -> str:
        """One line for the run log, as ``vistune sft``'s: how many pairs were dropped or skipped."""
        if self.paired:
            return (f"{len(self)} pairs; {self.dropped} dropped (longer than max_length), "
                    f"{self.skipped} bad records skipped")  # fmt: skip
        return (f"{len(self)} answers; {self.dropped} dropped (longer than max_length), "
                f"{self.skipped} bad answers skipped")  # fmt: skip


class PreferenceCollator:
    """``collator(items) -> batch`` for :class:`PreferenceItems`.

    Paired: ``input_ids``, ``attention_mask``, ``labels`` of ``2B`` rows (chosen answers,
    then rejected ones), the ``B`` pairs' image tensors, and ``index`` ``(B,)``.
    Unpaired: ``B`` rows with ``label`` ``(B,)``, and the KL sequences' ``kl_input_ids``,
    ``kl_attention_mask``, ``kl_labels`` (and other per-token keys, ``kl_mm_token_type_ids``):
    row ``i`` is prompt ``i`` with the answer of row ``i - 1``.

    :param encoder: the template (unpaired batches encode their KL sequences with it).
    :param pad_token_id: pads ``input_ids``.
    :param pad_to_multiple_of: padded lengths are rounded up to it.
    """

    def __init__(self, encoder: Any, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.encoder = encoder
        self.collate = Collator(pad_token_id, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        index = torch.tensor([item["index"] for item in items])
        if "chosen" in items[0]:
            batch = self.collate([item["chosen"] for item in items] + [item["rejected"] for item in items])
            return {**batch, "index": index}
        batch = self.collate([item["answer"] for item in items])
        kl_encoded = []
        for i, item in enumerate(items):
            previous = items[i - 1]["sample"].columns[ANSWERS]["completion"]
            encoded = self.encoder.encode(with_answer(item["sample"], previous))
            if encoded is None:  # too long with the other answer: the KL estimate uses the row's own answer
                encoded = item["answer"]
            kl_encoded.append(_text_only(encoded))
        kl = self.collate(kl_encoded)
        return {
            **batch,
            "index": index,
            "label": torch.tensor([bool(item["label"]) for item in items]),
            **{f"{KL_PREFIX}{key}": value for key, value in kl.items()},
        }
