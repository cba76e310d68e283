"""Reading dataset records into :class:`vistune.templates.Sample` objects, lazily.

Records come from a source (:mod:`vistune.data.sources`: a JSONL file, a JSON array, or
what a source format opens, such as a ``datasets`` directory or a hub id) and are read
by a record format (:mod:`vistune.data.formats`): the one the dataset declares or, when
it declares none, the one whose detector claims each record.  Both kinds are plugins
(:class:`vistune.specs.DataFormat`); nothing here names one.

Nothing is parsed up front: opening a JSONL file indexes the byte offset of each line
(a JSON array is scanned once for the offsets of its elements), a record is parsed when
it is read, and its images are opened then.  Image paths are relative to the dataset's
image directory, then to the records file's directory.  A broken record or a missing
image raises :class:`vistune.errors.DataError` naming the file and the 1-based line; with
``on_bad_record="skip"`` it is counted in :attr:`RecordDataset.skipped` and the next
good record is read in its place.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vistune.data.formats import RecordReader, detected_source
from vistune.data.locate import DatasetLocation
from vistune.data.sources import open_records_file
from vistune.errors import DataError
from vistune.registry import Registry
from vistune.specs import DataFormat, load_ref
from vistune.templates import IMAGE_TAG, Sample

ON_BAD_RECORD = ("error", "skip")

REMOTE_PREFIXES = ("http://", "https://")
#: Largest remote image fetched for a dataset record (bytes); the server's bound on request images.
MAX_REMOTE_IMAGE_BYTES = 32 * 1024 * 1024
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
    """The bytes at ``url``, fetched as the server fetches request images (:mod:`vistune.serving.remote`).

    Redirects are checked hop by hop, the body is bounded (:data:`MAX_REMOTE_IMAGE_BYTES`)
    and the fetch by time; cloud metadata addresses are refused.  Hosts of the private
    network are allowed: a dataset's images may live on an image store there.
    """
    try:
        from vistune.serving.errors import APIError
        from vistune.serving.remote import fetch_remote
    except ImportError as exc:  # httpx
        raise DataError(f"{where}: fetching image {url} needs httpx", hint="pip install httpx") from exc
    box: dict[str, Any] = {}

    def fetch() -> None:
        try:
            box["data"] = asyncio.run(fetch_remote(url, max_bytes=MAX_REMOTE_IMAGE_BYTES, param="image",
                                                   allow_private=True))  # fmt: skip
        except APIError as exc:
            box["error"] = exc
        except ImportError as exc:
            box["error"] = exc

    # A thread of its own: the caller may be running an event loop (the inference engines do).
    thread = threading.Thread(target=fetch, name="vistune-image-fetch")
    thread.start()
    thread.join()
    error = box.get("error")
    if isinstance(error, ImportError):
        raise DataError(f"{where}: fetching image {url} needs httpx", hint="pip install httpx") from error
    if error is not None:
        raise DataError(f"{where}: cannot fetch image {url}: {error.message}") from error
    return box["data"]


def _embedded_bytes(data: Any, where: str) -> bytes:
    """A ``datasets.Image`` cell's ``bytes``: raw bytes, or base64 text where JSON had to hold them."""
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DataError(f"{where}: the image's 'bytes' is text but not base64: {exc}") from exc
    raise DataError(f"{where}: the image's 'bytes' must be bytes or base64 text, got {type(data).__name__}")


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
            return _decode_image(_embedded_bytes(image["bytes"], where), "the embedded image", where)
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
        reader: RecordReader,
        image_roots: Sequence[Path] = (),
        on_bad_record: str = "error",
        allow_remote_images: bool = False,
        max_samples: int | None = None,
        allowed_image_dirs: Sequence[Path] = (),
    ):
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
        self._source = source
        self.reader = reader
        data_dir = [source.image_root] if source.image_root is not None else []
        #: Where relative image paths are looked for, in order.
        self.image_roots = tuple(dict.fromkeys([*(Path(p) for p in image_roots), *data_dir]))
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
    def path(self) -> Path | str:
        """What the dataset is named by in messages: its file, directory or hub id."""
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
        sample = self.reader.read(record, where)
        messages, image_refs, columns = sample.messages, list(sample.images), dict(sample.columns)
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
        if not candidates:
            raise DataError(f"{where}: image {_clip(path)!r} is a relative path, and {self.path} has no folder to "
                            "find it in", hint="give images as bytes, URLs or absolute paths")  # fmt: skip
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


def registered_formats() -> Registry[DataFormat]:
    """The data formats the process's plugins register."""
    from vistune.plugins import get_plugin_manager

    return get_plugin_manager().registries.formats


def _format(formats: Registry[DataFormat], name: str, field: str) -> DataFormat:
    if name not in formats:
        raise DataError(f"{field}: {formats.unknown_message(name)}", hint="`vistune list formats` shows them all")
    return formats.get(name)


def open_source(location: DatasetLocation, formats: Registry[DataFormat]) -> Any:
    """The record source of a located dataset: its source format's, or its JSON/JSONL file."""
    if not location.found:
        raise DataError(f"dataset not found: {location.how}", hint=location.hint)
    named = str(location.data_file)
    declared = formats.get(location.format) if location.format in formats else None
    if declared is not None and declared.is_source:
        return load_ref(declared.open_source)(named)
    path = Path(location.data_file)
    if not path.exists():
        raise DataError(f"{path} does not exist", hint=location.hint)
    detected = detected_source(formats, named)
    if detected is not None:
        return load_ref(detected.open_source)(named)
    if path.is_dir():
        raise DataError(f"{path} is a directory that no data format opens", hint="point dataset at a JSON/JSONL file")
    return open_records_file(path)


def read_dataset(
    location: DatasetLocation,
    *,
    on_bad_record: str = "error",
    allow_remote_images: bool = False,
    max_samples: int | None = None,
    allowed_image_dirs: Sequence[str | os.PathLike] = (),
    record_format: str | None = None,
    formats: Registry[DataFormat] | None = None,
) -> RecordDataset:
    """Open the records of a located dataset, lazily.

    :param location: from :func:`vistune.data.locate.locate_dataset`; its ``format`` (a
        registered record or source format, or ``records``/``None`` to detect both) and
        ``image_dir`` are used.
    :param on_bad_record: ``"error"`` raises on a broken record or missing image;
        ``"skip"`` counts it and reads the next good record instead.
    :param allow_remote_images: open ``http(s)://`` image URLs (else they are an error).
    :param max_samples: use only the first records.
    :param allowed_image_dirs: directories besides the dataset's own folder and image
        directory that local images may come from.
    :param record_format: the record format every record is in (the config's
        ``dataset_format``); by default the location's, or detected record by record.
    :param formats: the registered data formats (default: the process's plugins').
    :raises DataError: when the dataset is not found, its file cannot be indexed, or a
        format named is not registered.
    """
    formats = registered_formats() if formats is None else formats
    declared = None
    if record_format:
        declared = _format(formats, record_format, "dataset_format")
        if declared.read is None:
            raise DataError(f"dataset_format: {record_format!r} opens datasets but reads no records",
                            hint="name a record format (`vistune list formats`), or leave dataset_format unset")  # fmt: skip
    elif location.format in formats and formats.get(location.format).read is not None:
        declared = formats.get(location.format)
    elif location.format not in (None, "records") and location.format not in formats:
        _format(formats, location.format, f"dataset {location.spec.name if location.spec else location.data_file}")
    source = open_source(location, formats)
    roots = [location.image_dir] if location.image_dir else []
    return RecordDataset(
        source,
        reader=RecordReader(list(formats), declared),
        image_roots=roots,
        on_bad_record=on_bad_record,
        allow_remote_images=allow_remote_images,
        max_samples=max_samples,
        allowed_image_dirs=[Path(d) for d in allowed_image_dirs],
    )


def read_records_file(path: str | os.PathLike, **options: Any) -> RecordDataset:
    """:func:`read_dataset` for a local JSON/JSONL file or datasets directory (images relative to it).

    ``options`` are :func:`read_dataset`'s.
    """
    path = Path(path)
    image_dir = path if path.is_dir() else path.parent
    return read_dataset(DatasetLocation(path, image_dir, None, how="local path"), **options)
