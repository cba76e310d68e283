"""Every record of a dataset checked before anything heavy starts.

Reading stays lazy (a record is parsed and its images decoded when a batch needs it),
but a broken record should not surface after the model has loaded and training has
run for a while.  :func:`read_validated` opens a dataset with the run's options and
checks every record the way reading would, short of decoding images: the JSON, the
format's fields, one image per ``<image>`` tag, and each local image file present
inside the dataset's folders.  With ``on_bad_record: error`` the problems are the
run's error, all of them counted and the first ones named ``file:line``; with
``skip`` they are counted up front and the records are left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vistune.data.locate import DatasetLocation
from vistune.data.readers import RecordDataset, read_dataset
from vistune.errors import DataError

#: How many problems an error names (all are counted).
PROBLEMS_SHOWN = 10


def print_line(line: str) -> None:
    """Print one log line at once (the default ``log``)."""
    print(line, flush=True)


def read_validated(location: DatasetLocation, config: Any, *, log: Callable[[str], None] | None = print_line) -> RecordDataset:
    """The dataset at ``location``, opened with ``config``'s data options and every record checked.

    :param config: the run's config (``on_bad_record``, ``allow_remote_images``,
        ``max_samples``, ``allowed_image_dirs``, ``dataset_format``).
    :param log: where the line about skipped records goes (None: nowhere).
    :raises DataError: listing the bad records (``on_bad_record: error``), or when every
        record is bad.
    """
    records = read_dataset(
        location,
        on_bad_record=config.on_bad_record,
        allow_remote_images=config.allow_remote_images,
        max_samples=config.max_samples,
        allowed_image_dirs=config.allowed_image_dirs,
        record_format=config.dataset_format,
    )
    started = time.monotonic()
    bad = records.validate()
    took = time.monotonic() - started
    if not bad:
        return records
    problems = list(bad.values())
    listed = "\n  ".join(problems[:PROBLEMS_SHOWN])
    more = f"\n  ... and {len(problems) - PROBLEMS_SHOWN} more" if len(problems) > PROBLEMS_SHOWN else ""
    summary = f"{len(bad)} of {len(records)} records of {records.path} are bad"
    if len(bad) == len(records) or config.on_bad_record != "skip":
        hint = "fix the records" + ("" if len(bad) == len(records) else ", or set on_bad_record: skip to leave them out")
        raise DataError(f"{summary}:\n  {listed}{more}", hint=hint)
    if log is not None:
        log(f"vistune: {summary} and are left out (checked in {took:.1f} s); first: {problems[0]}")
    return records
