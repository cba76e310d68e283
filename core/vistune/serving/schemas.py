"""Request bodies of the OpenAI-compatible endpoints, validated strictly.

Types are strict (``"max_tokens": "5"`` is refused, not coerced), so a client bug shows
up as a clear 400 instead of surprising output.  Fields of the OpenAI API that vistune
does not implement are refused when set to anything but their neutral value, rather
than silently ignored.
"""

from __future__ import annotations

import json
import re
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


async def read_body(request: Any) -> bytes:
    """The body of a Starlette ``request``, read no further than :data:`MAX_BODY_BYTES`.

    A declared ``Content-Length`` over the limit is refused before anything is read, and a
    chunked body is refused as soon as it passes the limit, so a huge upload never sits in
    memory whole.

    :raises APIError: 413.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(raw: bytes, model_class: type[_CompletionRequestBase]) -> Any:
    """Validate a JSON request body into ``model_class``.

    :raises APIError: 400 naming the first invalid field.
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
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
