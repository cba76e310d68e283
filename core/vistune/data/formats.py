"""Record formats at read time: which registered format reads a record, and helpers for writing one.

Formats are plugins (:class:`vistune.specs.DataFormat`, hook
``vistune_register_data_formats``): core names none of them.  :class:`RecordReader`
reads each record with the format its dataset declares or, when it declares none,
with the one format whose ``detect`` claims the record (none or several is an error
naming ``file:line`` and the formats).  The helpers below turn the pieces other tools
write (role names, OpenAI-style content parts, single values or lists) into vistune's
conversation, so a format plugin only maps field names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from vistune.chat_template import ROLES
from vistune.errors import DataError
from vistune.specs import DataFormat, load_ref
from vistune.templates import IMAGE_TAG, Sample

#: Role names of other conversation formats (ShareGPT, LLaVA, Gemini), mapped to vistune's.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def role(value: Any, where: str, i: int) -> str:
    """vistune's role for a message's role name (``human`` -> ``user``, ``gpt`` -> ``assistant``).

    :raises DataError: ``{where}: message {i} has role ...`` for any other name.
    """
    name = ROLE_ALIASES.get(value, value) if isinstance(value, str) else value
    if name not in ROLES:
        raise DataError(f"{where}: message {i} has role {value!r}; expected system, user or assistant")
    return name


def content_text(content: Any, where: str, i: int) -> tuple[str, list[Any], int]:
    """A message content as text with ``<image>`` tags: (text, images named inline, bare image parts).

    ``content`` is a string, ``None``, or an OpenAI-style list of parts
    (``{"type": "text", "text"}``, ``{"type": "image"}``, ``{"type": "image", "image": path}``,
    ``{"type": "image_url", "image_url": {"url"}}``); each image part becomes a tag.
    """
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


def as_list(value: Any) -> list[Any]:
    """``None`` -> ``[]``, a list or tuple as a list, anything else as a list of one."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def columns_without(record: dict, used: Iterable[str]) -> dict[str, Any]:
    """The record's fields other than ``used``: the columns rewards and metrics get by name."""
    used = set(used)
    return {key: value for key, value in record.items() if key not in used}


def present(record: Any, key: str) -> bool:
    """The record has ``key`` with a value (a ``datasets`` row holds every column, ``None`` where unset)."""
    return isinstance(record, dict) and record.get(key) is not None


def exchange(pairs: Any, where: str, field: str) -> list[dict[str, str]]:
    """``[[query, response], ...]`` (ms-swift's and Alpaca's ``history``) as user/assistant messages."""
    if pairs is None:
        return []
    if not isinstance(pairs, list):
        raise DataError(f"{where}: '{field}' must be a list of [query, response] pairs, got {type(pairs).__name__}")
    messages = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"{where}: '{field}' entry {i} must be a [query, response] pair of strings, got {pair!r}")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def place_untagged_images(messages: list[dict[str, str]], images: Sequence[Any], where: str) -> None:
    """Put a tag for each image the text does not place at the start of the first user message.

    That is where ms-swift (its templates' default tags) and TRL put them, so records
    written for those tools read unchanged.  More tags than images stays an error (the
    reader's count names it).
    """
    missing = len(images) - sum(m["content"].count(IMAGE_TAG) for m in messages)
    if missing <= 0:
        return
    first = next((m for m in messages if m["role"] == "user"), None)
    if first is None:
        raise DataError(f"{where}: the record has images but no user message to show them in")
    first["content"] = IMAGE_TAG * missing + first["content"]


def text_field(record: dict, key: str, where: str, *, required: bool = True) -> str | None:
    """``record[key]`` as a string (``None`` when absent and not required)."""
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        got = "nothing" if value is None else type(value).__name__
        raise DataError(f"{where}: '{key}' must be a string, got {got}")
    return value


# -- choosing the source format of a dataset, and the format of each record ----------------------


def detected_source(formats: Iterable[DataFormat], location: str) -> DataFormat | None:
    """The one source format whose ``detect_source`` claims ``location`` (a path or a hub id), if any.

    :raises DataError: when several claim it.
    """
    claims = [f for f in formats if f.detect_source is not None and load_ref(f.detect_source)(location)]
    if len(claims) > 1:
        names = " and ".join(repr(f.name) for f in claims)
        raise DataError(f"{location} could be opened by the data formats {names}",
                        hint="register the dataset with the format it is in")  # fmt: skip
    return claims[0] if claims else None


def _checked_sample(result: Any, fmt: DataFormat, where: str) -> Sample:
    """``result`` if it is what readers promise: a Sample of ``{"role", "content": str}`` messages."""
    if not isinstance(result, Sample):
        raise DataError(f"{where}: data format {fmt.name!r} returned {type(result).__name__}, not a vistune Sample")
    for i, message in enumerate(result.messages):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: data format {fmt.name!r} made message {i} {message!r}; "
                            "expected {'role': system|user|assistant, 'content': str}")  # fmt: skip
    return result


class RecordReader:
    """Reads raw records with the declared record format, or the one that detects each.

    Pickles for DataLoader worker processes: specs are kept, the functions they name are
    loaded again on first use.
    """

    def __init__(self, formats: Sequence[DataFormat], declared: DataFormat | None = None):
        if declared is not None and declared.read is None:
            raise ValueError(f"data format {declared.name!r} reads no records (it is a source format)")
        self.declared = declared
        self.detecting = tuple(f for f in formats if f.detect is not None)
        self._loaded: dict[Any, Any] = {}

    def _function(self, fmt: DataFormat, field: str) -> Any:
        key = (fmt.name, field)
        if key not in self._loaded:
            self._loaded[key] = load_ref(getattr(fmt, field))
        return self._loaded[key]

    def _detectors(self) -> list[tuple[DataFormat, Any]]:
        """``(format, detect function)`` of every detecting format, loaded once (called for every record)."""
        if "detectors" not in self._loaded:
            self._loaded["detectors"] = [(fmt, self._function(fmt, "detect")) for fmt in self.detecting]
        return self._loaded["detectors"]

    @staticmethod
    def _claims(fmt: DataFormat, detect: Any, record: dict, where: str) -> bool:
        try:
            return bool(detect(record))
        except Exception as exc:  # a plugin's detector must not take the reading down unexplained
            raise DataError(f"{where}: the detector of data format {fmt.name!r} raised {type(exc).__name__}: {exc}",
                            hint="a detector returns True or False for any record; fix that plugin or set "
                            "dataset_format")  # fmt: skip

    def format_of(self, record: Any, where: str) -> DataFormat:
        """The format that reads ``record``.

        :raises DataError: when the record is not an object, or (no format declared)
            no format or several claim it.
        """
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
        if self.declared is not None:
            return self.declared
        claims = [fmt for fmt, detect in self._detectors() if self._claims(fmt, detect, record, where)]
        if len(claims) == 1:
            return claims[0]
        keys = ", ".join(record) or "none"
        if not claims:
            expected = "; ".join(f"{f.name} ({', '.join(f.fields)})" if f.fields else f.name for f in self.detecting)
            raise DataError(f"{where}: the record is in no known data format (its keys: {keys})",
                            hint=f"the formats and the fields that mark them: {expected}")  # fmt: skip
        names = " and ".join(repr(f.name) for f in claims)
        raise DataError(f"{where}: the record could be in the data formats {names} (its keys: {keys})",
                        hint=f"set dataset_format to the one it is in ({', '.join(f.name for f in claims)})")  # fmt: skip

    def read(self, record: Any, where: str) -> Sample:
        """``record`` as a :class:`Sample` of messages, image references and columns."""
        fmt = self.format_of(record, where)
        return _checked_sample(self._function(fmt, "read")(record, where), fmt, where)

    def __getstate__(self):
        return {**self.__dict__, "_loaded": {}}
