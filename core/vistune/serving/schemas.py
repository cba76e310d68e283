"""Request bodies of the OpenAI-compatible endpoints, validated strictly.

Types are strict (``"max_tokens": "5"`` is refused, not coerced), so a client bug shows
up as a clear 400 instead of surprising output.  Fields of the OpenAI API that vistune
does not implement are refused when set to anything but their neutral value, rather
than silently ignored.

Bodies are read within :data:`BODY_READ_TIMEOUT_S`, checked for nesting deeper than
:data:`MAX_JSON_DEPTH` and for more arrays, objects and values than real requests hold
before they are parsed, and every string in them must be valid
Unicode text (no lone surrogates), so malformed input is refused with a 4xx instead of
failing deep inside the parser or the tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import re
from itertools import accumulate
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from vistune.serving.errors import APIError, bad_request

#: Largest request body accepted (bytes): room for a few large base64 images.
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_N = 16
MAX_STOP = 4
#: Prompts in one /v1/completions request: each is a request to the engine, and the
#: admission limit counts HTTP requests, so this keeps the engine's queue bounded.
MAX_PROMPTS = 64
#: Seeds are 64-bit signed integers, as in vLLM's server; completion ``i`` is seeded
#: ``seed + i``, which then stays inside the range torch's generators accept.
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
#: Deepest nesting of JSON arrays and objects accepted in a body.  Real requests nest a
#: few levels (body, messages, message, content, part, image_url); the bound keeps the
#: parser, which recurses once per level, far from Python's recursion limit.
MAX_JSON_DEPTH = 64
#: Time a client has to send the whole body once the headers are in (seconds).  A
#: client that stalls mid-body is answered 408 and disconnected; it never holds a place
#: in the admission limit, which a request enters only once its body has been read.
BODY_READ_TIMEOUT_S = 30.0
#: Most JSON arrays and objects accepted in a body, and most commas between values
#: (about the number of values).  Real requests hold a few dozen containers and, at
#: most, a prompt of token ids as long as a 128k context, twice; the bounds refuse bodies
#: of millions of tiny values (``[[],[],...]``), small on the wire and gigabytes once
#: parsed, and keep what pydantic validates (and its list of errors) small.
MAX_JSON_CONTAINERS = 10_000
MAX_JSON_VALUES = 262_144

Number = StrictFloat | StrictInt


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: StrictStr
    detail: StrictStr | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | StrictStr


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _CompletionRequestBase(_Body):
    """Fields shared by chat and text completion requests."""

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    #: vLLM's extension: keep generating past end-of-sequence tokens (benchmarks).
    ignore_eos: StrictBool = False
    # Accepted only at their neutral values (see _check_unsupported).
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise bad_request(f"at most {MAX_STOP} stop strings are supported, got {len(stops)}", "stop")
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_CompletionRequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class CompletionRequest(_CompletionRequestBase):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s): one string or token-id list per completion group."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if len(prompt) > MAX_PROMPTS:
            raise bad_request(f"at most {MAX_PROMPTS} prompts per request are supported, got {len(prompt)}", "prompt")
        return list(prompt)


def _check_unsupported(body: _CompletionRequestBase) -> None:
    neutral = {
        "presence_penalty": body.presence_penalty in (None, 0),
        "frequency_penalty": body.frequency_penalty in (None, 0),
        "logit_bias": not body.logit_bias,
        "logprobs": body.logprobs in (None, False, 0),
        "top_logprobs": body.top_logprobs in (None, 0),
        "response_format": body.response_format in (None, {}) or body.response_format.get("type") == "text",
        "tools": not body.tools,
        "functions": not body.functions,
    }
    if isinstance(body, CompletionRequest):
        neutral |= {"echo": not body.echo, "best_of": body.best_of in (None, 1), "suffix": not body.suffix}
    for field, ok in neutral.items():
        if not ok:
            raise bad_request(f"{field} is not supported by this server", field, "unsupported_parameter")


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _is_field(part: Any) -> bool:
    """Whether a validation-error location part is a field name or index, not a union member's type tag."""
    if isinstance(part, int):
        return True
    return bool(re.fullmatch(r"[a-z_][a-z0-9_]*", part)) and part not in _TYPE_TAGS


def _too_large() -> APIError:
    return APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")


async def read_body(request: Any, timeout: float | None = None) -> bytes:
    """The body of a Starlette ``request``, read no further than :data:`MAX_BODY_BYTES`
    and for no longer than ``timeout`` seconds (default :data:`BODY_READ_TIMEOUT_S`).

    A declared ``Content-Length`` over the limit is refused before anything is read, and a
    chunked body is refused as soon as it passes the limit, so a huge upload never sits in
    memory whole.  A body that does not arrive in time is answered 408 with
    ``Connection: close``: the rest of it may still be on its way, so the connection
    cannot carry another request.

    :raises APIError: 413, 408.
    """
    timeout = BODY_READ_TIMEOUT_S if timeout is None else timeout
    try:
        return await asyncio.wait_for(_read_limited(request), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None  # fmt: skip


async def _read_limited(request: Any) -> bytes:
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _too_large()
            chunks.append(chunk)
    except ClientDisconnect:  # the client is gone: refused, rather than logged as an internal error
        raise bad_request("the client disconnected before sending the whole body", code="client_disconnected") from None
    return b"".join(chunks)


# -- JSON that parses without harm -------------------------------------------------------

#: Bytes that are not quotes, brackets or commas, deleted to leave a body's structure.
_NOT_STRUCTURE = bytes(range(256)).translate(None, b'"[]{},')
#: Nesting change of each byte: +1 for an opening bracket, -1 for a closing one.
_DEPTH_STEP = [1 if byte in b"[{" else -1 if byte in b"]}" else 0 for byte in range(256)]
#: Bytes handled at once by the nesting scan: keeps its temporary lists small.
_SCAN_CHUNK = 1 << 20


def _as_utf8(raw: bytes) -> bytes:
    """``raw`` in UTF-8.  ``json.loads`` also reads UTF-16 and UTF-32 bodies, whose bytes
    the nesting scan cannot read; lone surrogates are kept, to be refused by name later.

    :raises UnicodeDecodeError: for bytes invalid in the detected encoding.
    """
    encoding = json.detect_encoding(raw)
    if encoding in ("utf-8", "utf-8-sig"):
        return raw
    return raw.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")


def _structure_outside_strings(raw: bytes) -> bytes:
    """The brackets and commas of a UTF-8 JSON text that are not inside strings, in order.

    Escapes are dropped first (``\\\\``, then ``\\"``), so every quote left opens or
    closes a string; strings are then cut out by quote parity.  All steps are bytes
    methods running in C, chunk by chunk, so a 64 MiB body is scanned in about a second
    whatever its shape (parsing the same body takes longer).
    """
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    text = text.replace(b'""', b"")  # strings without brackets; removing two quotes keeps the parity
    if b'"' not in text:
        return text
    pieces, inside = [], False
    for start in range(0, len(text), _SCAN_CHUNK):
        parts = text[start : start + _SCAN_CHUNK].split(b'"')
        pieces.append(b"".join(parts[inside::2]))
        inside ^= len(parts) % 2 == 0  # an odd number of quotes in the chunk
    return b"".join(pieces)


def nested_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether the JSON text ``raw`` (UTF-8) nests arrays and objects more than ``limit`` deep.

    For any prefix ``json.loads`` accepts, the scan splits strings as the parser does, so
    it sees at least the depth the parser would reach.  It stops at the first chunk that
    goes too deep.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    return _deeper_than(_structure_outside_strings(raw), limit)


def _deeper_than(structure: bytes, limit: int) -> bool:
    depth = 0
    for start in range(0, len(structure), _SCAN_CHUNK):
        chunk = structure[start : start + _SCAN_CHUNK]
        if max(accumulate(map(_DEPTH_STEP.__getitem__, chunk), initial=depth)) > limit:
            return True
        depth += chunk.count(b"[") + chunk.count(b"{") - chunk.count(b"]") - chunk.count(b"}")
    return False


def check_json_structure(raw: bytes) -> None:
    """Refuse a UTF-8 JSON text that nests too deep or holds too many values, before it is parsed.

    Counts over the whole body (brackets and commas inside strings included) bound what
    lies outside strings, so most bodies need no scan at all.  The nesting scan, the one
    step that is not a bytes method, reads at most a few times :data:`MAX_JSON_CONTAINERS`
    brackets, so a body of millions of arrays is refused as fast as it is scanned.

    :raises APIError: 400 ``json_too_deep`` past :data:`MAX_JSON_DEPTH`, ``json_too_large``
        past :data:`MAX_JSON_CONTAINERS` or :data:`MAX_JSON_VALUES`.
    """
    containers, commas = raw.count(b"[") + raw.count(b"{"), raw.count(b",")
    if containers <= min(MAX_JSON_DEPTH, MAX_JSON_CONTAINERS) and commas <= MAX_JSON_VALUES:
        return
    structure = _structure_outside_strings(raw)
    brackets = structure.translate(None, b",")
    containers = brackets.count(b"[") + brackets.count(b"{")
    # too many containers: say "too deep" when the nesting shows within the first ones (a [[[[... body)
    if containers > MAX_JSON_DEPTH and _deeper_than(brackets[: 4 * MAX_JSON_CONTAINERS], MAX_JSON_DEPTH):
        raise bad_request(f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
                          code="json_too_deep")  # fmt: skip
    if containers > MAX_JSON_CONTAINERS:
        raise bad_request(f"the request body holds {containers} JSON arrays and objects; at most "
                          f"{MAX_JSON_CONTAINERS} are accepted", code="json_too_large")  # fmt: skip
    if structure.count(b",") > MAX_JSON_VALUES:
        raise bad_request(f"the request body holds more than {MAX_JSON_VALUES} JSON values", code="json_too_large")


#: A UTF-16 surrogate: half of a pair in UTF-16, never a character of text on its own.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _printable(name: str) -> str:
    """A key as it can be shown in an error (lone surrogates written as escapes)."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _not_unicode(value: Any, path: str = "") -> str | None:
    """The path (``messages.0.content``) of the first string in parsed JSON that is not
    valid Unicode text, or ``None``.

    JSON's ``\\ud800`` escape decodes to a lone surrogate, which no encoder (UTF-8, a
    tokenizer) accepts.  A bad key is reported as the object holding it.
    """
    if isinstance(value, str):
        return None if value.isascii() or not _SURROGATE.search(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{_printable(key)}" if path else _printable(key)
            if not key.isascii() and _SURROGATE.search(key):
                return path or where
            if (found := _not_unicode(item, where)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _not_unicode(item, f"{path}.{i}" if path else str(i))) is not None:
                return found
    return None


def load_json(raw: bytes) -> Any:
    """Parse a JSON body, refusing what would fail inside the parser or later on.

    :raises APIError: 400: not JSON, nested deeper than :data:`MAX_JSON_DEPTH`, more
        arrays, objects or values than :data:`MAX_JSON_CONTAINERS` / :data:`MAX_JSON_VALUES`, or a
        string that is not valid Unicode (the ``param`` names it).
    """
    try:
        raw = _as_utf8(raw)
        check_json_structure(raw)
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    path = _not_unicode(data)
    if path is not None:
        raise bad_request(f"the text of {path or 'the request body'} is not valid Unicode: it holds a lone "
                          "surrogate (such as \\ud800 without its pair)", path or None, "invalid_string")  # fmt: skip
    return data


def parse_body(raw: bytes, model_class: type[_CompletionRequestBase]) -> Any:
    """Validate a JSON request body into ``model_class``.

    :raises APIError: 400 naming the first invalid field.
    """
    data = load_json(raw)
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    try:
        body = model_class.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if _is_field(p)) or None
        raise bad_request(f"invalid value for {param or 'the request'}: {first['msg']}", param) from None
    _check_unsupported(body)
    return body
