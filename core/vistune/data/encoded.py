"""A dataset of encoded samples: records are read and encoded when a batch asks for them.

Nothing is encoded up front, so training starts at once on any dataset size.  A sample
the encoder drops (``truncation: drop`` makes ``encode`` return ``None``) is counted
and replaced by the next sample that encodes, so every index yields a training example
and ``len()`` stays fixed for the sampler.  Code that would rather leave such samples
out (a packer) reads :meth:`EncodedDataset.get`, which returns ``None`` for them.  With
``on_bad_record: skip`` the same happens to samples the encoder rejects with a
:class:`vistune.errors.DataError` (an unreadable image, a tag/image mismatch).

DataLoader worker processes each work on a copy of the dataset; what they learn of a
sample (encoded, dropped, bad) goes to a status array in shared memory, so the counts
read in the training process and the samples known to be dropped are the same in all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from vistune.data.readers import SKIPPED_REASONS_KEPT
from vistune.errors import DataError, VistuneError
from vistune.templates import Encoder, Sample

#: A sample's status in :attr:`EncodedDataset.status`: not read yet, encoded, dropped for
#: its length, or bad (skipped by the reader or rejected by the encoder).
UNKNOWN, ENCODED, DROPPED, BAD = 0, 1, 2, 3


class EncodedDataset(Dataset):
    """``dataset[i]`` is ``encoder.encode(records[i])``, or the next sample that encodes if that one is dropped.

    :param records: a sequence of :class:`Sample` (a :class:`vistune.data.readers.RecordDataset`
        or a plain list).
    :param encoder: the template's encoder.
    :param on_bad_record: ``"skip"`` also replaces samples whose encoding raises
        :class:`DataError`; default: the records' own setting, else ``"error"``.

    ``dropped`` counts samples the encoder dropped for length and ``skipped`` bad records
    (those the reader skipped plus those the encoder rejected), met in this process or
    in any DataLoader worker reading a copy of it; ``skipped_reasons`` are each process's own.
    """

    def __init__(self, records: Sequence[Sample], encoder: Encoder, *, on_bad_record: str | None = None):
        self.records = records
        self.encoder = encoder
        self.on_bad_record = on_bad_record or getattr(records, "on_bad_record", "error")
        #: One byte per sample (:data:`UNKNOWN`, :data:`ENCODED`, :data:`DROPPED`, :data:`BAD`),
        #: in shared memory: DataLoader workers, forked or spawned, write to this same array.
        self.status = torch.zeros(len(records), dtype=torch.uint8).share_memory_()
        for index in getattr(records, "known_bad", ()):  # found by validation before training: counted up front
            self.status[index] = BAD
        self._rejected: dict[int, str] = {}  # reasons of the samples this process found bad

    def __len__(self) -> int:
        return len(self.records)

    @property
    def dropped(self) -> int:
        """Samples longer than ``max_length`` met so far (``truncation: drop``)."""
        return int((self.status == DROPPED).sum())

    @property
    def skipped(self) -> int:
        """Bad records met so far: skipped by the reader or rejected by the encoder."""
        return int((self.status == BAD).sum())

    @property
    def skipped_reasons(self) -> list[str]:
        """Why the first bad records this process met were skipped (``file:line: reason``)."""
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
        if self.status[index].item() in (DROPPED, BAD):
            return None
        get_record = getattr(self.records, "get", None)
        sample = get_record(index) if callable(get_record) else self.records[index]
        if sample is None:  # a bad record the reader skipped (it keeps the reason)
            self.status[index] = BAD
            return None
        try:
            encoded = self.encoder.encode(sample)
        except DataError as exc:
            if self.on_bad_record != "skip":
                raise
            self._rejected[index] = exc.message
            self.status[index] = BAD
            return None
        self.status[index] = ENCODED if encoded is not None else DROPPED
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
        # the status array goes along (shared with a spawned DataLoader worker, copied by plain
        # pickle); the reasons stay behind: each process keeps those of the samples it read
        state = dict(self.__dict__)
        state["_rejected"] = {}
        return state


#: How PyTorch re-raises an exception from a DataLoader worker: its type, with the worker's
#: formatted traceback as the only argument.
_WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def error_from_worker(error: VistuneError) -> VistuneError:
    """The error a DataLoader worker raised, as it would have been raised in this process.

    A worker's exception reaches the training process re-raised by PyTorch: the same
    type, but its message is ``Caught DataError in DataLoader worker process 0`` and the
    worker's traceback, and its hint is gone.  That traceback ends with the original
    error as ``str()`` gives it (message, then the hint line), which is read back here.
    ``error`` itself is returned if it did not come from a worker.
    """
    if error.hint is not None or not _WORKER_ERROR.match(error.message):
        return error
    cls = type(error)
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    _, found, text = error.message.rpartition(f"\n{name}: ")
    if not found:
        return error
    message, found, hint = text.rstrip("\n").rpartition("\n  hint: ")
    if not found:
        message, hint = hint, None
    try:
        return cls(message, hint=hint)
    except TypeError:  # a subclass with a constructor of its own
        return VistuneError(message, hint=hint)
