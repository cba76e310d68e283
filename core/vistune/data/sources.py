"""Where a dataset's raw records come from: JSON/JSONL files, ``datasets`` directories and hub ids.

A *record source* gives raw records by index and says where each comes from:

``path``
    what messages name the dataset by (a file, a directory, a hub id);
``image_root``
    the directory relative image paths are resolved against (``None``: none);
``len(source)``, ``source.where(i)`` (``file:line``, ``dir row N``), ``source.raw(i)``
    the record count, where record ``i`` is, record ``i`` parsed;
``source.iter_raw(count)``
    ``(index, record or DataError)`` of the first ``count`` records, for checking them all
    in one pass (images left undecoded).

JSON and JSONL files are opened by :func:`open_records_file`.  The others are the
source formats that plugins register (:class:`vistune.specs.DataFormat` ``open_source``);
vistune's own default plugins register :func:`open_saved_dataset` and
:func:`open_hub_dataset` with them.
"""

from __future__ import annotations

import json
import os
import re
from array import array
from pathlib import Path
from typing import Any

from vistune.errors import DataError

_WHITESPACE = re.compile(r"\s*")
#: ``org/name`` or ``org/name:split`` (``train``, ``test[:100]``): a dataset on the Hugging Face Hub.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<split>[\w.-]+(?:\[[^\]]*\])?))?$")
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


# -- JSON and JSONL files ----------------------------------------------------------------



class JsonLinesSource:
    """A JSONL file: one record per non-blank line, found by byte offset."""

    def __init__(self, path: Path):
        self.path = path
        self.image_root = path.parent
        self.starts = array("q")
        self.lines = array("q")
        position = 0
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    self.starts.append(position)
                    self.lines.append(number)
                position += len(line)

    def __len__(self) -> int:
        return len(self.starts)

    def where(self, index: int) -> str:
        return f"{self.path}:{self.lines[index]}"

    def raw(self, index: int) -> Any:
        # Opened per read: cheap next to decoding images, and safe in DataLoader worker processes.
        with open(self.path, "rb") as f:
            f.seek(self.starts[index])
            return self._parse(f.readline(), index)

    def iter_raw(self, count: int):
        """``(index, record or DataError)`` of the first ``count`` records, reading the file once."""
        with open(self.path, "rb") as f:
            for index in range(count):
                f.seek(self.starts[index])
                try:
                    yield index, self._parse(f.readline(), index)
                except DataError as exc:
                    yield index, exc

    def _parse(self, line: bytes, index: int) -> Any:
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            detail = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise DataError(f"{self.where(index)}: not valid JSON: {detail}") from exc


class JsonArraySource:
    """A JSON array: the text is scanned once for element boundaries, elements are parsed on access.

    A broken element cannot be stepped over (where the next one starts is unknown), so a
    malformed array is an error whatever ``on_bad_record`` says.
    """

    def __init__(self, path: Path, text: str):
        self.path = path
        self.image_root = path.parent
        self.text = text
        self.starts = array("q")
        self.ends = array("q")
        self.lines = array("q")
        decoder = json.JSONDecoder()
        index = _WHITESPACE.match(text, 0).end() + 1  # past '['
        line, counted = 1, 0
        while True:
            index = _WHITESPACE.match(text, index).end()
            if index < len(text) and text[index] == "]" and not self.starts:
                break
            line += text.count("\n", counted, index)
            counted = index
            try:
                _, end = decoder.raw_decode(text, index)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from exc
            self.starts.append(index)
            self.ends.append(end)
            self.lines.append(line)
            index = _WHITESPACE.match(text, end).end()
            if index < len(text) and text[index] == ",":
                index += 1
                continue
            if index < len(text) and text[index] == "]":
                break
            line += text.count("\n", counted, index)
            raise DataError(f"{path}:{line}: not valid JSON: expected ',' or ']' after record {len(self.starts)}")

    def __len__(self) -> int:
        return len(self.starts)

    def where(self, index: int) -> str:
        return f"{self.path}:{self.lines[index]}"

    def raw(self, index: int) -> Any:
        return json.loads(self.text[self.starts[index] : self.ends[index]])

    def iter_raw(self, count: int):
        return ((index, self.raw(index)) for index in range(count))


def open_records_file(path: Path) -> JsonLinesSource | JsonArraySource:
    """A JSON array or JSONL file's records, told apart by the file's first character."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head.startswith(b"["):
        # A JSON array is one document: it has to be read whole once to find its records.
        return JsonArraySource(path, path.read_text(encoding="utf-8-sig"))
    return JsonLinesSource(path)


# -- datasets: save_to_disk directories and hub ids -------------------------------------------


def _datasets_module(what: str) -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{what} needs the datasets package", hint="pip install datasets") from exc
    return datasets


def _one_split(loaded: Any, what: str, datasets: Any) -> Any:
    """The ``train`` split of a DatasetDict (or its only split); a Dataset as it is."""
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    splits = list(loaded)
    split = "train" if "train" in loaded else splits[0] if len(splits) == 1 else None
    if split is None:
        raise DataError(f"{what} holds the splits {', '.join(splits)} but no 'train' split",
                        hint="name the split: a split directory, or org/name:split for a hub dataset")  # fmt: skip
    return loaded[split]


class DatasetsSource:
    """The rows of a ``datasets.Dataset`` (memory-mapped Arrow; rows decoded on access)."""

    def __init__(self, dataset: Any, path: str | Path, image_root: Path | None):
        self.dataset = dataset
        self.path = path
        self.image_root = image_root

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, index: int) -> str:
        return f"{self.path} row {index}"

    def raw(self, index: int) -> Any:
        return self.dataset[index]

    def iter_raw(self, count: int):
        """Rows with image columns left as stored (``{"bytes", "path"}``): checking needs no decoding."""
        import datasets

        rows = self.dataset.select(range(count)) if count < len(self.dataset) else self.dataset
        for name, feature in rows.features.items():
            if isinstance(feature, datasets.Image):
                rows = rows.cast_column(name, datasets.Image(decode=False))
            elif isinstance(getattr(feature, "feature", None), datasets.Image):  # a list of images
                rows = rows.cast_column(name, type(feature)(datasets.Image(decode=False)))
        return enumerate(rows)


def is_saved_dataset(location: str) -> bool:
    """``location`` is a directory that ``datasets``' ``save_to_disk`` wrote."""
    path = Path(location).expanduser()
    return path.is_dir() and any((path / marker).exists() for marker in _SAVED_MARKERS)


def open_saved_dataset(location: str) -> DatasetsSource:
    """A ``save_to_disk`` directory's rows (its ``train`` split, or its only one)."""
    path = Path(location).expanduser()
    datasets = _datasets_module(f"{path} is a datasets save_to_disk directory, which")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot load the datasets directory: {exc}") from exc
    return DatasetsSource(_one_split(loaded, str(path), datasets), path, path)


def is_hub_id(location: str) -> bool:
    """``location`` reads as ``org/name`` or ``org/name:split`` and is no local path.

    A name whose ``org`` is a local folder is a mistyped local path, not an id.
    """
    local = os.path.expanduser(location)
    if location.endswith((".json", ".jsonl")) or os.path.exists(local) or os.path.isdir(os.path.dirname(local)):
        return False
    return HUB_ID.match(location) is not None


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def open_hub_dataset(location: str) -> DatasetsSource:
    """A Hugging Face Hub dataset's rows, through ``datasets.load_dataset``.

    ``datasets`` downloads it (with its progress bars) or takes it from its cache, and
    honours ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and ``HF_DATASETS_CACHE``.

    :raises DataError: naming the id when it cannot be loaded (offline and not cached,
        no such dataset, no such split).
    """
    match = HUB_ID.match(location)
    if match is None:
        raise DataError(f"{location!r} is not a Hugging Face dataset id (org/name or org/name:split)")
    repo, split = match["repo"], match["split"]
    datasets = _datasets_module(f"the Hugging Face dataset {location}")
    try:
        loaded = datasets.load_dataset(repo, split=split)
    except Exception as exc:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, ValueError...)
        if _offline():
            hint = (f"HF_HUB_OFFLINE is set and {repo} is not in the datasets cache: load it once on a machine that "
                    "is online with the same HF_DATASETS_CACHE, or unset HF_HUB_OFFLINE")  # fmt: skip
        else:
            hint = "check the id and split on the Hub, the network (HF_ENDPOINT), and HF_TOKEN for a gated dataset"
        raise DataError(f"cannot load the Hugging Face dataset {location}: {type(exc).__name__}: {exc}",
                        hint=hint) from exc  # fmt: skip
    return DatasetsSource(_one_split(loaded, f"the Hugging Face dataset {repo}", datasets), location, None)
