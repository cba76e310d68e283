"""A dataset of encoded samples: records are read and encoded when a batch asks for them.

Nothing is encoded up front, so training starts at once on any dataset size.  A sample
the encoder drops (``truncation: drop`` makes ``encode`` return ``None``) is counted
and replaced by the next sample that encodes, so every index yields a training example
and ``len()`` stays fixed for the sampler.  Code that would rather leave such samples
out (a packer) reads :meth:`EncodedDataset.get`, which returns ``None`` for them.  With
``on_bad_record: skip`` the same happens to samples the encoder rejects with a
:class:`vistune.errors.DataError` (an unreadable image, a tag/image mismatch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from vistune.data.readers import SKIPPED_REASONS_KEPT
from vistune.errors import DataError
from vistune.templates import Encoder, Sample


class EncodedDataset(Dataset):
    """``dataset[i]`` is ``encoder.encode(records[i])``, or the next sample that encodes if that one is dropped.

    :param records: a sequence of :class:`Sample` (a :class:`vistune.data.readers.RecordDataset`
        or a plain list).
    :param encoder: the template's encoder.
    :param on_bad_record: ``"skip"`` also replaces samples whose encoding raises
        :class:`DataError`; default: the records' own setting, else ``"error"``.

    ``dropped`` counts samples the encoder dropped for length and ``skipped`` bad records
    (those the reader skipped plus those the encoder rejected), each per process.
    """

    def __init__(self, records: Sequence[Sample], encoder: Encoder, *, on_bad_record: str | None = None):
        self.records = records
        self.encoder = encoder
        self.on_bad_record = on_bad_record or getattr(records, "on_bad_record", "error")
        self._dropped: set[int] = set()
        self._rejected: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def dropped(self) -> int:
        """Samples longer than ``max_length`` met so far (``truncation: drop``)."""
        return len(self._dropped)

    @property
    def skipped(self) -> int:
        """Bad records met so far: skipped by the reader or rejected by the encoder."""
        return len(self._rejected) + getattr(self.records, "skipped", 0)

    @property
    def skipped_reasons(self) -> list[str]:
        """Why the first bad records were skipped (``file:line: reason``)."""
        reasons = list(getattr(self.records, "skipped_reasons", []))
        return (reasons + list(self._rejected.values()))[:SKIPPED_REASONS_KEPT]

    def source(self, index: int) -> str:
        """Where sample ``index`` comes from (``file:line``), for error messages."""
        source = getattr(self.records, "source", None)
        if callable(source):
            return source(index)
        return getattr(self.records[index], "source", "") or f"sample {index}"

    def get(self, index: int) -> dict[str, Any] | None:
        """The encoding of sample ``index``; ``None`` if it is dropped or (when skipping) bad."""
        if index in self._dropped or index in self._rejected:
            return None
        get_record = getattr(self.records, "get", None)
        sample = get_record(index) if callable(get_record) else self.records[index]
        if sample is None:  # a bad record the reader skipped (and counted)
            return None
        try:
            encoded = self.encoder.encode(sample)
        except DataError as exc:
            if self.on_bad_record != "skip":
                raise
            self._rejected[index] = exc.message
            return None
        if encoded is None:
            self._dropped.add(index)
        return encoded

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample {index} is out of range (the dataset has {n})")
        index %= n
        for offset in range(n):
            encoded = self.get((index + offset) % n)
            if encoded is not None:
                return encoded
        first = f"; first: {self.skipped_reasons[0]}" if self.skipped_reasons else ""
        raise DataError(
            f"no sample of the dataset could be encoded ({self.dropped} longer than max_length, {self.skipped} bad)",
            hint="raise max_length, or check the records" + first,
        )

    def summary(self) -> str:
        """One line for the run log: how many samples were dropped or skipped so far."""
        return (
            f"{len(self)} samples; {self.dropped} dropped (longer than max_length), "
            f"{self.skipped} bad records skipped"
        )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_dropped"], state["_rejected"] = set(), {}  # worker processes keep their own counts
        return state
