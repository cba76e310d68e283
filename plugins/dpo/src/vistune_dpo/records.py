"""Preference records: TRL's and ms-swift's layouts, paired and unpaired, as vistune data formats.

Four record formats, registered through ``vistune_register_data_formats`` (see
:mod:`vistune_dpo.plugin`) and read only where a run declares them: a preference run
detects the layout of each file from its first record, and every record must then be in
it (``dataset_format`` in the config names one explicitly).

``trl-preference``
    TRL's ``{"prompt", "chosen", "rejected", "images"}``.  ``prompt`` is a string (the
    user's turn) or a list of messages; ``chosen`` and ``rejected`` are strings or lists
    holding one assistant message.  ``image`` (one) may stand for ``images``.  Images
    whose place the prompt does not mark (no ``<image>`` tag, no image part) go at the
    start of the first user message, where TRL puts them.
``ms-swift-preference``
    ms-swift's ``{"messages": [..., {"role": "assistant", "content": chosen}],
    "rejected_response", "images"}``: vistune's ``messages`` format plus the rejected answer.
``trl-kto``
    TRL's unpaired ``{"prompt", "completion", "label", "images"}``; ``label`` is true for a
    desirable answer.
``ms-swift-kto``
    ms-swift's: ``messages`` ending with the answer, and ``label``.

Each reads a record as a :class:`vistune.templates.Sample` whose ``messages`` are the
prompt, with the answers in ``columns[ANSWERS]``: ``{"chosen", "rejected"}`` or
``{"completion", "label"}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from vistune.data.formats import as_list, columns_without, content_text
from vistune.default_plugins.data_formats import read_messages
from vistune.errors import DataError
from vistune.templates import IMAGE_TAG, Sample
from vistune_dpo.layouts import ANSWERS, LAYOUTS, PAIRED

def detect_layout(record: Any) -> str | None:
    """The preference format whose fields ``record`` has, or None."""
    if not isinstance(record, dict):
        return None
    return next((name for name, keys in LAYOUTS.items() if all(k in record for k in keys)), None)


def layouts_help() -> str:
    return "; ".join(f"{name}: {', '.join(keys)}" for name, keys in LAYOUTS.items())


def _require(record: Any, name: str, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in LAYOUTS[name] if k not in record]
    if missing:
        keys = ", ".join(record) or "none"
        raise DataError(f"{where}: a {name} record needs {', '.join(LAYOUTS[name])}; this one lacks "
                        f"{', '.join(missing)} (keys: {keys})")  # fmt: skip


def _answer(value: Any, field: str, where: str) -> str:
    """An answer given as a string, or as a list holding one assistant message."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        message = value[0]
        if message.get("role", "assistant") != "assistant":
            raise DataError(f"{where}: '{field}' must be an assistant message, got role {message.get('role')!r}")
        value, inline, bare = content_text(message.get("content"), where, 0)
        if inline or bare:
            raise DataError(f"{where}: '{field}' is an answer and cannot hold images")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{field}' must be a string or a list with one assistant message, "
                        f"got {type(value).__name__}")  # fmt: skip
    if IMAGE_TAG in value:
        raise DataError(f"{where}: '{field}' is an answer and cannot hold an {IMAGE_TAG} tag")
    if not value.strip():
        raise DataError(f"{where}: '{field}' is empty")
    return value


def _label(record: dict, where: str) -> bool:
    label = record["label"]
    if not isinstance(label, bool) and label not in (0, 1):
        raise DataError(f"{where}: 'label' must be true (a desirable answer) or false, got {label!r}")
    return bool(label)


def _trl_prompt(record: dict, where: str) -> Sample:
    """The prompt of a TRL record, images placed as TRL places them."""
    prompt = record["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    images = record.get("images", record.get("image"))
    sample = read_messages({"messages": messages, "images": as_list(images)}, where)
    if sample.messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: 'prompt' ends with an assistant message; the answers have fields of their own")
    if sample.images and not any(IMAGE_TAG in m["content"] for m in sample.messages):
        first_user = next((m for m in sample.messages if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(f"{where}: the prompt has images but no user message to put them in")
        first_user["content"] = IMAGE_TAG * len(sample.images) + first_user["content"]
    return sample


def _swift_prompt(record: dict, where: str) -> tuple[Sample, str]:
    """(the prompt, the final answer) of an ms-swift record."""
    sample = read_messages(record, where)
    if sample.messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: 'messages' must end with the assistant's answer")
    answer = sample.messages.pop()["content"]
    if not sample.messages:
        raise DataError(f"{where}: 'messages' has no prompt before the answer")
    return sample, answer


def _with_answers(prompt: Sample, record: dict, used: tuple[str, ...], answers: dict[str, Any], where: str) -> Sample:
    columns = {**columns_without(record, used), ANSWERS: answers}
    return Sample(prompt.messages, prompt.images, columns, where)


def read_trl_preference(record: Any, where: str) -> Sample:
    """A ``trl-preference`` record: prompt, chosen, rejected."""
    _require(record, "trl-preference", where)
    answers = {"chosen": _answer(record["chosen"], "chosen", where),
               "rejected": _answer(record["rejected"], "rejected", where)}  # fmt: skip
    used = ("prompt", "chosen", "rejected", "images", "image")
    return _with_answers(_trl_prompt(record, where), record, used, answers, where)


def read_ms_swift_preference(record: Any, where: str) -> Sample:
    """An ``ms-swift-preference`` record: messages ending with the chosen answer, and rejected_response."""
    _require(record, "ms-swift-preference", where)
    prompt, chosen = _swift_prompt(record, where)
    answers = {"chosen": _answer(chosen, "chosen", where),
               "rejected": _answer(record["rejected_response"], "rejected_response", where)}  # fmt: skip
    return _with_answers(prompt, record, ("messages", "images", "rejected_response"), answers, where)


def read_trl_kto(record: Any, where: str) -> Sample:
    """A ``trl-kto`` record: prompt, completion, label."""
    _require(record, "trl-kto", where)
    answers = {"completion": _answer(record["completion"], "completion", where), "label": _label(record, where)}
    used = ("prompt", "completion", "label", "images", "image")
    return _with_answers(_trl_prompt(record, where), record, used, answers, where)


def read_ms_swift_kto(record: Any, where: str) -> Sample:
    """An ``ms-swift-kto`` record: messages ending with the answer, and label."""
    _require(record, "ms-swift-kto", where)
    prompt, completion = _swift_prompt(record, where)
    answers = {"completion": _answer(completion, "completion", where), "label": _label(record, where)}
    return _with_answers(prompt, record, ("messages", "images", "label"), answers, where)


def read_preferences(location: Any, config: Any, *, paired: bool, log: Any = print) -> Any:
    """The preference records at a located dataset, every one checked before the model loads.

    The format is ``dataset_format`` when the config sets it, or the one a registered
    dataset declares, else detected from the file's first record; every record is then read in it, bad ones named ``file:line``
    (:func:`vistune.data.validation.read_validated`).

    :param paired: the algorithm learns from pairs (DPO, ORPO, SimPO); unpaired
        algorithms (KTO) take pairs too, as one desirable and one undesirable answer.
    :raises DataError: for a file in no preference format, bad records, or unpaired
        records given to a paired algorithm.
    """
    from vistune.data.readers import open_source, registered_formats
    from vistune.data.validation import read_validated

    # the config's dataset_format, else a registered dataset's declared format, else the first record's
    layout = config.dataset_format or (location.format if location.format in LAYOUTS else None)
    if layout is None:
        source = open_source(location, registered_formats())
        if len(source) == 0:
            raise DataError(f"{source.path} holds no records")
        try:
            first = source.raw(0)
        except DataError as exc:
            raise DataError(exc.message, hint="fix the record: the first one decides the file's preference format") from exc
        layout = detect_layout(first)
        if layout is None:
            keys = ", ".join(first) if isinstance(first, dict) else type(first).__name__
            raise DataError(f"{source.where(0)}: not a preference record (keys: {keys})",
                            hint=f"preference formats and their fields: {layouts_help()}")  # fmt: skip
    elif layout not in LAYOUTS:
        raise DataError(f"dataset_format {layout!r} is not a preference format",
                        hint=f"preference formats and their fields: {layouts_help()}")  # fmt: skip
    if paired and layout not in PAIRED:
        raise DataError(f"{location.data_file} holds unpaired ({layout}) records, and this algorithm learns from "
                        "pairs of a chosen and a rejected answer",
                        hint="use algorithm: kto for answers labelled desirable or not, or give pairs")  # fmt: skip
    records = read_validated(location, attrs.evolve(config, dataset_format=layout), log=log)
    return records if paired or layout not in PAIRED else Unpaired(records)


class Unpaired(Sequence):
    """Pairs as single answers labelled desirable or not: a pair gives its chosen (true), then its rejected (false).

    A bad pair (``on_bad_record: skip``) gives two bad answers: :attr:`known_bad` and
    :meth:`get` speak of answers, as :class:`vistune.data.encoded.EncodedDataset` reads them.
    """

    def __init__(self, records: Sequence[Sample]):
        self.records = records
        self.on_bad_record = getattr(records, "on_bad_record", "error")

    def __len__(self) -> int:
        return len(self.records) * 2

    @property
    def known_bad(self) -> dict[int, str]:
        """Answers of the bad pairs validation found: ``{index: "file:line: problem"}``."""
        bad = getattr(self.records, "known_bad", {})
        return {2 * index + side: reason for index, reason in bad.items() for side in (0, 1)}

    def get(self, index: int) -> Sample | None:
        """Answer ``index``, or ``None`` when its pair is bad and bad records are skipped."""
        get_record = getattr(self.records, "get", None)
        sample = get_record(index // 2) if callable(get_record) else self.records[index // 2]
        return None if sample is None else self._answer(sample, chosen=index % 2 == 0)

    def __getitem__(self, index: int) -> Sample:
        return self._answer(self.records[index // 2], chosen=index % 2 == 0)

    @staticmethod
    def _answer(sample: Sample, *, chosen: bool) -> Sample:
        answers = sample.columns[ANSWERS]
        answer = {"completion": answers["chosen" if chosen else "rejected"], "label": chosen}
        return Sample(sample.messages, sample.images, {**sample.columns, ANSWERS: answer}, sample.source)
