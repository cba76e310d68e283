"""Reading dataset records into :class:`vistune.templates.Sample` objects, lazily.

Three formats (:data:`FORMATS`):

``messages``
    JSONL (one object per line) or a JSON array of
    ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}], "images": [...]}``.
    ``content`` is a string with one ``<image>`` tag per image, or an OpenAI-style list
    of parts (``{"type": "text", "text": ...}``, ``{"type": "image"}``,
    ``{"type": "image", "image": path}``, ``{"type": "image_url", "image_url": {"url": ...}}``),
    which becomes a string with ``<image>`` tags.  Other keys are kept as ``columns``.
``llava-instruct``
    LLaVA's ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value": ...}]}``.
``hf-disk``
    A ``datasets`` ``save_to_disk`` directory whose rows are in either format above
    (image columns may be ``datasets.Image`` features).

A local records file whose format is not declared is told apart per record.

Nothing is parsed up front: opening a JSONL file indexes the byte offset of each line
(a JSON array is scanned once for the offsets of its elements), a record is parsed when
it is read, and its images are opened then.  Image paths are relative to the dataset's
image directory, then to the records file's directory.  A broken record or a missing
image raises :class:`vistune.errors.DataError` naming the file and the 1-based line; with
``on_bad_record="skip"`` it is counted in :attr:`RecordDataset.skipped` and the next
good record is read in its place.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vistune.chat_template import ROLES
from vistune.data.locate import DatasetLocation
from vistune.errors import DataError
from vistune.templates import IMAGE_TAG, Sample

FORMATS = ("messages", "llava-instruct", "hf-disk")
ON_BAD_RECORD = ("error", "skip")

#: Role names of other conversation formats (ShareGPT, LLaVA), mapped to vistune's.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}

REMOTE_PREFIXES = ("http://", "https://")
_REMOTE_TIMEOUT_S = 30
_WHITESPACE = re.compile(r"\s*")
#: How many skipped records keep their reason (the count has no limit).
SKIPPED_REASONS_KEPT = 100


# -- images ------------------------------------------------------------------------


def _decode_image(data: bytes, what: str, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return opened.copy()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{where}: {what} is not a readable image: {exc}") from exc


def _fetch(url: str, where: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=_REMOTE_TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot fetch image {url}: {exc}") from exc


def open_image(image: Any, *, where: str = "", allow_remote: bool = False) -> Any:
    """A loaded PIL image from what a record or a request names.

    :param image: a PIL image; a path (relative to the working directory; a dataset's
        records resolve theirs first, :meth:`RecordDataset.read`); a ``file://`` URL; a ``data:image/...;base64,``
        URI; an ``http(s)://`` URL (only with ``allow_remote``); or a ``datasets.Image``
        cell (``{"bytes": ..., "path": ...}``).
    :param where: names the record in errors (``file:line``).
    :raises DataError: for a missing or unreadable image, or a URL that is not allowed.
    """
    where = where or "a sample"
    if hasattr(image, "getpixel"):  # a PIL image, without importing PIL to check
        return image
    if isinstance(image, dict):
        if image.get("bytes"):
            return _decode_image(image["bytes"], "the embedded image", where)
        image = image.get("path")
    if isinstance(image, Path):
        image = str(image)
    if not isinstance(image, str) or not image:
        raise DataError(f"{where}: an image must be a path, a URL or a PIL image, got {image!r}")
    if image.startswith(REMOTE_PREFIXES):
        if not allow_remote:
            raise DataError(
                f"{where}: image {image} is a remote URL, and remote images are not allowed",
                hint="download the images and use local paths, or set allow_remote_images: true",
            )
        return _decode_image(_fetch(image, where), image, where)
    if image.startswith("data:"):
        header, _, payload = image.partition(",")
        if not header.endswith(";base64"):
            raise DataError(f"{where}: only base64 data URIs are supported for images, got {header!r}")
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError as exc:
            raise DataError(f"{where}: the image data URI is not valid base64: {exc}") from exc
        return _decode_image(data, "the data-URI image", where)
    image = image.removeprefix("file://")
    path = Path(image).expanduser()
    if not path.is_file():
        raise DataError(f"{where}: image {image!r} not found")
    return _decode_image(path.read_bytes(), str(path), where)


# -- record sources: raw records by index, and where each comes from ----------------


class _JsonLinesSource:
    """A JSONL file: one record per non-blank line, found by byte offset."""

    def __init__(self, path: Path):
        self.path = path
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


class _JsonArraySource:
    """A JSON array: the text is scanned once for element boundaries, elements are parsed on access.

    A broken element cannot be stepped over (where the next one starts is unknown), so a
    malformed array is an error whatever ``on_bad_record`` says.
    """

    def __init__(self, path: Path, text: str):
        self.path = path
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


class _HFDiskSource:
    """A ``datasets`` save_to_disk directory (memory-mapped Arrow; rows decoded on access)."""

    def __init__(self, path: Path):
        try:
            import datasets
        except ImportError as exc:
            raise DataError(f"{path} is a datasets save_to_disk directory, which needs the datasets package",
                            hint="pip install datasets") from exc  # fmt: skip
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise DataError(f"{path}: cannot load the datasets directory: {exc}") from exc
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            split = "train" if "train" in loaded else splits[0] if len(splits) == 1 else None
            if split is None:
                raise DataError(f"{path} holds the splits {', '.join(splits)} but no 'train' split",
                                hint="point dataset at the split's own directory")  # fmt: skip
            loaded = loaded[split]
        self.path = path
        self.dataset = loaded

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


def _open_source(path: Path, fmt: str | None):
    if fmt == "hf-disk" or path.is_dir():
        return _HFDiskSource(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head.startswith(b"["):
        # A JSON array is one document: it has to be read whole once to find its records.
        return _JsonArraySource(path, path.read_text(encoding="utf-8-sig"))
    return _JsonLinesSource(path)


# -- records -> samples ----------------------------------------------------------------


def _role(value: Any, where: str, i: int) -> str:
    role = ROLE_ALIASES.get(value, value) if isinstance(value, str) else value
    if role not in ROLES:
        raise DataError(f"{where}: message {i} has role {value!r}; expected system, user or assistant")
    return role


def _content_text(content: Any, where: str, i: int) -> tuple[str, list[Any], int]:
    """A message content as text with ``<image>`` tags: (text, images named inline, bare image parts)."""
    if isinstance(content, str):
        return content, [], 0
    if content is None:
        return "", [], 0
    if not isinstance(content, list):
        kind = type(content).__name__
        raise DataError(f"{where}: message {i} content must be a string or a list of parts, got {kind}")
    pieces: list[str] = []
    inline: list[Any] = []
    bare = 0
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(part.get("text") or "")
        elif kind in ("image", "image_url"):
            pieces.append(IMAGE_TAG)
            source = part.get("image") or part.get("url") or part.get("path") or part.get("image_url")
            if isinstance(source, dict):
                source = source.get("url")
            if source is None:
                bare += 1
            else:
                inline.append(source)
        else:
            raise DataError(f"{where}: message {i} has a content part of type {kind!r}; expected text or image")
    return "".join(pieces), inline, bare


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def messages_sample(record: dict, where: str) -> tuple[list[dict[str, str]], list[Any], dict[str, Any]]:
    """(messages, image references, other columns) of a ``messages`` record."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    listed = _as_list(record.get("images"))
    out, inline, bare = [], [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content', got {message!r}")
        text, named, unnamed = _content_text(message.get("content"), where, i)
        out.append({"role": _role(message.get("role"), where, i), "content": text})
        inline += named
        bare += unnamed
    if inline and (listed or bare):
        raise DataError(f"{where}: images are named both inside the messages and in 'images' (or by bare image parts)",
                        hint="name every image in one place")  # fmt: skip
    columns = {k: v for k, v in record.items() if k not in ("messages", "images")}
    return out, inline or listed, columns


def llava_instruct_sample(record: dict, where: str) -> tuple[list[dict[str, str]], list[Any], dict[str, Any]]:
    """(messages, image references, other columns) of a LLaVA-Instruct record."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} objects")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversation turn {i} must be {{'from': human|gpt, 'value': str}}, got {turn!r}")
        messages.append({"role": _role(turn.get("from"), where, i), "content": turn["value"]})
    columns = {k: v for k, v in record.items() if k not in ("conversations", "image")}
    return messages, _as_list(record.get("image")), columns


def _record_format(record: Any, where: str, declared: str | None) -> Callable:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if declared == "messages" or (declared != "llava-instruct" and "messages" in record):
        return messages_sample
    if declared == "llava-instruct" or "conversations" in record:
        return llava_instruct_sample
    raise DataError(f"{where}: the record has neither 'messages' nor 'conversations' (keys: {', '.join(record)})",
                    hint="use the messages format or LLaVA-Instruct's; see vistune.data.readers")  # fmt: skip


# -- the dataset -------------------------------------------------------------------------


class RecordDataset(Sequence):
    """The samples of a dataset, read on access: ``dataset[i]`` is a :class:`Sample`.

    ``len()`` counts records (after ``max_samples``), not good records: a bad record is
    only found when it is read.  With ``on_bad_record="skip"`` reading a bad record
    counts it (:attr:`skipped`, :attr:`skipped_reasons`) and returns the next good one
    (wrapping round), so every index yields a sample.  Counts are per process (each
    DataLoader worker keeps its own).
    """

    def __init__(
        self,
        source: Any,
        *,
        format: str | None = None,
        image_roots: Sequence[Path] = (),
        on_bad_record: str = "error",
        allow_remote_images: bool = False,
        max_samples: int | None = None,
        allowed_image_dirs: Sequence[Path] = (),
    ):
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
        self._source = source
        self.format = format if format in FORMATS else None
        data_dir = source.path if source.path.is_dir() else source.path.parent
        #: Where relative image paths are looked for, in order.
        self.image_roots = tuple(dict.fromkeys([*(Path(p) for p in image_roots), data_dir]))
        #: The only directories local images may come from (compared without following links,
        #: so a link the dataset's owner put inside its folder is followed).
        self.image_dirs = tuple(os.path.abspath(p) for p in (*self.image_roots, *allowed_image_dirs))
        self.on_bad_record = on_bad_record
        self.allow_remote_images = allow_remote_images
        self._length = len(source) if max_samples is None else min(len(source), max(0, max_samples))
        self._bad: dict[int, str] = {}
        #: Bad records found by :meth:`validate`, known to every process that reads a copy.
        self._known_bad: dict[int, str] = {}

    @property
    def path(self) -> Path:
        return self._source.path

    def __len__(self) -> int:
        return self._length

    @property
    def skipped(self) -> int:
        """Bad records met so far (and skipped) in this process."""
        return len(self._bad)

    @property
    def skipped_reasons(self) -> list[str]:
        """Why the first skipped records were skipped (``file:line: reason``)."""
        return list(self._bad.values())[:SKIPPED_REASONS_KEPT]

    @property
    def known_bad(self) -> dict[int, str]:
        """Bad records :meth:`validate` found: ``{index: "file:line: problem"}``."""
        return dict(self._known_bad)

    def source(self, index: int) -> str:
        """Where record ``index`` comes from: ``file:line`` (``dir row N`` for datasets directories)."""
        return self._source.where(self._index(index))

    def _index(self, index: int) -> int:
        if not isinstance(index, int):
            raise TypeError(f"dataset indices must be integers, got {type(index).__name__}")
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"record {index} is out of range (the dataset has {self._length})")
        return index

    def _sample_parts(self, record: Any, where: str) -> tuple[list[dict[str, str]], list[Any], dict[str, Any]]:
        """(messages, image references, columns) of a raw record, its ``<image>`` tags counted."""
        messages, image_refs, columns = _record_format(record, where, self.format)(record, where)
        tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
        if tags != len(image_refs):
            raise DataError(f"{where}: {tags} {IMAGE_TAG} tag(s) but {len(image_refs)} image(s)",
                            hint=f"put one {IMAGE_TAG} tag in the text where each image goes")  # fmt: skip
        return messages, image_refs, columns

    def _image_ref(self, ref: Any, where: str) -> Any:
        """``ref`` with a local path resolved to an existing file inside :attr:`image_dirs`; nothing is opened.

        :raises DataError: for a missing file, a path that leaves the dataset's folders, a
            remote URL that is not allowed, or something that names no image.
        """
        path = ref.get("path") if isinstance(ref, dict) and not ref.get("bytes") else ref
        if isinstance(path, Path):
            path = str(path)
        if hasattr(ref, "getpixel") or isinstance(ref, dict) and ref.get("bytes"):
            return ref
        if not isinstance(path, str) or not path:
            raise DataError(f"{where}: an image must be a path, a URL or a PIL image, got {_clip(repr(ref))}")
        if path.startswith(REMOTE_PREFIXES):
            if not self.allow_remote_images:
                raise DataError(f"{where}: image {_clip(path)} is a remote URL, and remote images are not allowed",
                                hint="download the images and use local paths, or set allow_remote_images: true")  # fmt: skip
            return path
        if path.startswith("data:"):
            return path
        local = Path(path.removeprefix("file://")).expanduser()
        candidates = [local] if local.is_absolute() else [root / local for root in self.image_roots]
        for candidate in candidates:
            normal = os.path.abspath(candidate)
            if not any(normal == d or normal.startswith(d.rstrip(os.sep) + os.sep) for d in self.image_dirs):
                raise DataError(
                    f"{where}: image {_clip(path)!r} is outside the dataset's folders ({', '.join(self.image_dirs)})",
                    hint="keep images under the dataset's folder or image directory, or list their directory "
                    "in allowed_image_dirs",
                )
            if os.path.isfile(normal):
                return normal
        looked = ", ".join(str(c) for c in candidates)
        raise DataError(f"{where}: image {_clip(path)!r} not found (looked for {looked})",
                        hint="image paths are relative to the dataset's image directory or to the records file")  # fmt: skip

    def read(self, index: int) -> Sample:
        """Record ``index`` as a sample with its images opened.

        :raises DataError: naming the file and line, whatever ``on_bad_record`` says.
        """
        index = self._index(index)
        where = self._source.where(index)
        messages, image_refs, columns = self._sample_parts(self._source.raw(index), where)
        images = [open_image(self._image_ref(ref, where), where=where, allow_remote=self.allow_remote_images)
                  for ref in image_refs]  # fmt: skip
        return Sample(messages=messages, images=images, columns=columns, source=where)

    def validate(self) -> dict[int, str]:
        """Check every record without decoding images: ``{index: "file:line: problem"}`` of the bad ones.

        What is checked is what :meth:`read` would refuse short of decoding: the JSON, the
        format and its fields, one image per ``<image>`` tag, and each local image file
        present inside the dataset's folders.  The bad records found are remembered, so
        reading skips them without a second look (``on_bad_record: skip``).
        """
        bad: dict[int, str] = {}
        for index, record in self._source.iter_raw(self._length):
            where = self._source.where(index)
            try:
                if isinstance(record, DataError):
                    raise record
                _, image_refs, _ = self._sample_parts(record, where)
                for ref in image_refs:
                    self._image_ref(ref, where)
            except DataError as exc:
                bad[index] = exc.message if exc.message.startswith(where) else f"{where}: {exc.message}"
        self._known_bad = bad
        return bad

    def get(self, index: int) -> Sample | None:
        """Record ``index``, or ``None`` if it is bad and bad records are skipped (counted)."""
        index = self._index(index)
        if index in self._known_bad and self.on_bad_record == "skip":
            self._bad[index] = self._known_bad[index]
        if index in self._bad:
            return None
        try:
            return self.read(index)
        except DataError as exc:
            if self.on_bad_record == "error":
                raise
            self._bad[index] = str(exc.message)
            return None

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        index = self._index(index)
        for offset in range(self._length):
            sample = self.get((index + offset) % self._length)
            if sample is not None:
                return sample
        raise DataError(f"{self.path}: every record is bad ({self.skipped} skipped); first: {self.skipped_reasons[0]}")

    def __iter__(self):
        # Sequence's default iteration would substitute bad records; iterate good records once each.
        for index in range(self._length):
            sample = self.get(index)
            if sample is not None:
                yield sample

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_bad"] = {}  # worker processes keep their own counts
        return state


def _clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, for error messages."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def read_dataset(
    location: DatasetLocation,
    *,
    on_bad_record: str = "error",
    allow_remote_images: bool = False,
    max_samples: int | None = None,
    allowed_image_dirs: Sequence[str | os.PathLike] = (),
) -> RecordDataset:
    """Open the records of a located dataset, lazily.

    :param location: from :func:`vistune.data.locate.locate_dataset`; its ``format``
        (``messages``, ``llava-instruct``, ``hf-disk``, or ``records``/``None`` to tell
        apart per record) and ``image_dir`` are used.
    :param on_bad_record: ``"error"`` raises on a broken record or missing image;
        ``"skip"`` counts it and reads the next good record instead.
    :param allow_remote_images: open ``http(s)://`` image URLs (else they are an error).
    :param max_samples: use only the first records.
    :param allowed_image_dirs: directories besides the dataset's own folder and image
        directory that local images may come from.
    :raises DataError: when the dataset is not found or its file cannot be indexed.
    """
    if not location.found:
        raise DataError(f"dataset not found: {location.how}", hint=location.hint)
    path = Path(location.data_file)
    if not path.exists():
        raise DataError(f"{path} does not exist", hint=location.hint)
    source = _open_source(path, location.format)
    roots = [location.image_dir] if location.image_dir else []
    return RecordDataset(
        source,
        format=location.format,
        image_roots=roots,
        on_bad_record=on_bad_record,
        allow_remote_images=allow_remote_images,
        max_samples=max_samples,
        allowed_image_dirs=[Path(d) for d in allowed_image_dirs],
    )


def read_records_file(path: str | os.PathLike, **options: Any) -> RecordDataset:
    """:func:`read_dataset` for a local JSON/JSONL file or datasets directory (images relative to it)."""
    path = Path(path)
    image_dir = path if path.is_dir() else path.parent
    return read_dataset(DatasetLocation(path, image_dir, None, how="local path"), **options)
