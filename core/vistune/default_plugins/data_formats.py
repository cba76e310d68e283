"""The data formats vistune reads out of the box, registered as any plugin registers its own.

Record formats (one record -> a :class:`vistune.templates.Sample`):

``messages``
    ``{"messages": [{"role", "content"}], "images": [...]}``: OpenAI / TRL / ms-swift /
    LLaMA-Factory's messages; ``content`` is text with ``<image>`` tags or a list of parts.
``llava-instruct``
    LLaVA's ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}``.
``sharegpt``
    ``{"conversations": [{"from", "value"} or {"role", "content"}], "system", "images"|"image"}``
    as LLaMA-Factory and ms-swift write ShareGPT.
``ms-swift``
    ms-swift's ``{"system", "query", "response", "history": [[query, response]], "images"}``.
``alpaca``
    ``{"instruction", "input", "output", "system", "history", "images"}``: the prompt is the
    instruction, then the input on a new line (as LLaMA-Factory and ms-swift join them).
``prompt-completion``
    TRL's prompt-only and prompt-completion records, ``{"prompt", "completion", "images"|"image"}``:
    each a string (the user's turn, the answer) or a list of messages; pictures whose place the
    prompt does not place go at the start of the first user message, where TRL puts them.

Source formats (a ``dataset:`` value -> records, read by the formats above):

``hf-disk``
    a directory that ``datasets``' ``save_to_disk`` wrote.
``hf-hub``
    a Hugging Face Hub dataset id, ``org/name`` or ``org/name:split``, loaded with
    ``datasets.load_dataset``.

Every format but ``llava-instruct`` (whose records always place their picture) puts an image
that no ``<image>`` tag places at the start of the first user message, as ms-swift and TRL do.
Each record format takes only the fields it knows; every other field of a record
(``solution``, ``id``...) reaches rewards and metrics as a column of that name.

Why not TRL's converters: ``trl.data_utils.maybe_convert_to_chatml`` renames ShareGPT's
``from``/``value`` keys but keeps its ``human``/``gpt`` roles and knows no images, history,
query/response or Alpaca fields, and importing it imports transformers (seconds), while
these readers also run in the check of every record before anything heavy loads.
"""

from __future__ import annotations

from typing import Any

from vistune import hookimpl
from vistune.data.formats import (
    as_list,
    columns_without,
    content_text,
    exchange,
    place_untagged_images,
    present,
    role,
    text_field,
)
from vistune.errors import DataError
from vistune.specs import DataFormat
from vistune.templates import Sample

_HERE = "vistune.default_plugins.data_formats"


# -- messages -----------------------------------------------------------------------------------


def is_messages(record: dict) -> bool:
    return "messages" in record


def read_messages(record: dict, where: str) -> Sample:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    listed = as_list(record.get("images"))
    out, inline, bare = [], [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content', got {message!r}")
        text, named, unnamed = content_text(message.get("content"), where, i)
        out.append({"role": role(message.get("role"), where, i), "content": text})
        inline += named
        bare += unnamed
    if inline and (listed or bare):
        raise DataError(f"{where}: images are named both inside the messages and in 'images' (or by bare image parts)",
                        hint="name every image in one place")  # fmt: skip
    images = inline or listed
    place_untagged_images(out, images, where)
    return Sample(out, images, columns_without(record, ("messages", "images")), where)


# -- conversations: LLaVA-Instruct and ShareGPT ---------------------------------------------------


def _first_turn(record: dict) -> Any:
    turns = record.get("conversations")
    return turns[0] if isinstance(turns, list) and turns else None


def is_llava_instruct(record: dict) -> bool:
    """``conversations`` of from/value turns, pictures in ``image`` (ShareGPT's ``images`` or role turns are not)."""
    first = _first_turn(record)
    return "conversations" in record and not present(record, "images") and not (isinstance(first, dict) and "role" in first)


def read_llava_instruct(record: dict, where: str) -> Sample:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} objects")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversation turn {i} must be {{'from': human|gpt, 'value': str}}, got {turn!r}")
        messages.append({"role": role(turn.get("from"), where, i), "content": turn["value"]})
    return Sample(messages, as_list(record.get("image")), columns_without(record, ("conversations", "image")), where)


def is_sharegpt(record: dict) -> bool:
    """``conversations`` with role/content turns, or with the pictures in an ``images`` list."""
    first = _first_turn(record)
    return "conversations" in record and (present(record, "images") or (isinstance(first, dict) and "role" in first))


def read_sharegpt(record: dict, where: str) -> Sample:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} "
                        "or {'role', 'content'} objects")  # fmt: skip
    messages = []
    system = text_field(record, "system", where, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        keys = ("role", "content") if isinstance(turn, dict) and "role" in turn else ("from", "value")
        if not isinstance(turn, dict) or not isinstance(turn.get(keys[1]), str):
            raise DataError(f"{where}: conversation turn {i} must be {{'from', 'value': str}} or "
                            f"{{'role', 'content': str}}, got {turn!r}")  # fmt: skip
        messages.append({"role": role(turn.get(keys[0]), where, i), "content": turn[keys[1]]})
    if present(record, "images") and present(record, "image"):
        raise DataError(f"{where}: the record has both 'images' and 'image'", hint="list every picture in 'images'")
    images = as_list(record.get("images") if present(record, "images") else record.get("image"))
    place_untagged_images(messages, images, where)
    return Sample(messages, images, columns_without(record, ("conversations", "system", "images", "image")), where)


# -- ms-swift query/response and Alpaca -------------------------------------------------------------


def _with_system(record: dict, where: str, history_field: str) -> list[dict[str, str]]:
    system = text_field(record, "system", where, required=False)
    head = [{"role": "system", "content": system}] if system else []
    return head + exchange(record.get(history_field), where, history_field)


def is_ms_swift(record: dict) -> bool:
    return "query" in record


def read_ms_swift(record: dict, where: str) -> Sample:
    messages = _with_system(record, where, "history")
    messages.append({"role": "user", "content": text_field(record, "query", where)})
    response = text_field(record, "response", where, required=False)
    if response is not None:  # without one the record is a prompt (rl, infer)
        messages.append({"role": "assistant", "content": response})
    images = as_list(record.get("images"))
    place_untagged_images(messages, images, where)
    return Sample(messages, images, columns_without(record, ("system", "query", "response", "history", "images")), where)


def is_alpaca(record: dict) -> bool:
    return "instruction" in record


def read_alpaca(record: dict, where: str) -> Sample:
    messages = _with_system(record, where, "history")
    instruction = text_field(record, "instruction", where)
    extra = text_field(record, "input", where, required=False)
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    output = text_field(record, "output", where, required=False)
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    images = as_list(record.get("images"))
    place_untagged_images(messages, images, where)
    used = ("system", "instruction", "input", "output", "history", "images")
    return Sample(messages, images, columns_without(record, used), where)


# -- TRL's prompt-completion ----------------------------------------------------------------------------

#: Fields of TRL's preference (DPO) and unpaired (KTO) records: their answers are not a completion to learn.
_PREFERENCE_FIELDS = ("chosen", "rejected", "label")


def is_prompt_completion(record: dict) -> bool:
    return "prompt" in record and not any(key in record for key in _PREFERENCE_FIELDS)


def _turns(value: Any, default_role: str, where: str, field: str) -> tuple[list[dict[str, str]], list[Any], int]:
    """A prompt or completion as messages: (messages, images named inline, bare image parts)."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}], [], 0
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise DataError(f"{where}: '{field}' must be a string or a non-empty list of {{'role', 'content'}} messages")
    messages, inline, bare = [], [], 0
    for i, message in enumerate(value):
        text, named, unnamed = content_text(message.get("content"), where, i)
        messages.append({"role": role(message.get("role"), where, i), "content": text})
        inline += named
        bare += unnamed
    return messages, inline, bare


def read_prompt_completion(record: dict, where: str) -> Sample:
    messages, inline, bare = _turns(record.get("prompt"), "user", where, "prompt")
    if present(record, "completion"):  # without one the record is a prompt (rl, infer)
        answer, named, unnamed = _turns(record["completion"], "assistant", where, "completion")
        messages, inline, bare = messages + answer, inline + named, bare + unnamed
    if present(record, "images") and present(record, "image"):
        raise DataError(f"{where}: the record has both 'images' and 'image'", hint="list every picture in 'images'")
    listed = as_list(record.get("images") if present(record, "images") else record.get("image"))
    if inline and (listed or bare):
        raise DataError(f"{where}: images are named both inside the messages and in 'images' (or by bare image parts)",
                        hint="name every image in one place")  # fmt: skip
    images = inline or listed
    place_untagged_images(messages, images, where)
    return Sample(messages, images, columns_without(record, ("prompt", "completion", "images", "image")), where)


# -- registration -------------------------------------------------------------------------------------


@hookimpl
def vistune_register_data_formats(register):
    register(DataFormat(
        "messages", read=f"{_HERE}:read_messages", detect=f"{_HERE}:is_messages", fields=("messages", "images"),
        example={"messages": [{"role": "user", "content": "<image>What is in the picture?"},
                              {"role": "assistant", "content": "A red circle."}],
                 "images": ["images/0001.png"]},
        description="OpenAI/TRL/ms-swift messages: role and content (text with <image> tags, or parts), images",
    ))  # fmt: skip
    register(DataFormat(
        "llava-instruct", read=f"{_HERE}:read_llava_instruct", detect=f"{_HERE}:is_llava_instruct",
        fields=("conversations", "image"),
        example={"id": "000000033471", "image": "000000033471.jpg",
                 "conversations": [{"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
                                   {"from": "gpt", "value": "The bus is white and red."}]},
        description="LLaVA-Instruct: conversations of from/value turns, one picture in image",
    ))  # fmt: skip
    register(DataFormat(
        "sharegpt", read=f"{_HERE}:read_sharegpt", detect=f"{_HERE}:is_sharegpt",
        fields=("conversations", "system", "images"),
        example={"conversations": [{"from": "human", "value": "<image>Who are they?"},
                                   {"from": "gpt", "value": "They are two players of a football team."}],
                 "system": "You are a helpful assistant.", "images": ["mllm_demo_data/1.jpg"]},
        description="ShareGPT: conversations of from/value or role/content turns, system, images (or image)",
    ))  # fmt: skip
    register(DataFormat(
        "ms-swift", read=f"{_HERE}:read_ms_swift", detect=f"{_HERE}:is_ms_swift",
        fields=("query", "response", "history", "system", "images"),
        example={"system": "You are a helpful assistant.", "query": "<image>What is in the image?",
                 "response": "A cat on a sofa.", "history": [["Hello", "Hi! How can I help?"]],
                 "images": ["cat.png"]},
        description="ms-swift query/response: system, history of [query, response] pairs, images",
    ))  # fmt: skip
    register(DataFormat(
        "alpaca", read=f"{_HERE}:read_alpaca", detect=f"{_HERE}:is_alpaca",
        fields=("instruction", "input", "output", "system", "history", "images"),
        example={"instruction": "<image>Describe the picture.", "input": "Use one short sentence.",
                 "output": "A red circle on a white background.", "images": ["circle.png"]},
        description="Alpaca: instruction and input (the prompt, joined by a new line), output; system, history, images",
    ))  # fmt: skip
    register(DataFormat(
        "prompt-completion", read=f"{_HERE}:read_prompt_completion", detect=f"{_HERE}:is_prompt_completion",
        fields=("prompt", "completion", "images", "image"),
        example={"images": ["sky.png"],
                 "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the sky?"}]}],
                 "completion": [{"role": "assistant", "content": [{"type": "text", "text": "It is blue."}]}]},
        description="TRL prompt-only and prompt-completion: prompt and completion as text or messages, images (or image)",
    ))  # fmt: skip
    register(DataFormat(
        "hf-disk", open_source="vistune.data.sources:open_saved_dataset",
        detect_source="vistune.data.sources:is_saved_dataset",
        description="a directory written by datasets' save_to_disk (its train split); rows in any record format",
    ))  # fmt: skip
    register(DataFormat(
        "hf-hub", open_source="vistune.data.sources:open_hub_dataset", detect_source="vistune.data.sources:is_hub_id",
        description="a Hugging Face Hub dataset id, org/name or org/name:split, loaded with datasets.load_dataset",
    ))  # fmt: skip
