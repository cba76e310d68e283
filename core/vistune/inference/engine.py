"""The interface every inference backend implements, and the types it speaks.

One interface serves three callers: ``vistune infer`` (batched, offline), ``vistune
serve`` (many concurrent streaming requests) and RL rollouts (batched, with several
completions per prompt).  An engine therefore offers a blocking batched
:meth:`Engine.generate` and an asynchronous per-request :meth:`Engine.stream`; both may
be used at the same time from different threads.

This module imports nothing heavy: a plugin's engine module imports it to build results
and to apply the checks every engine makes alike (:func:`check_context`, :func:`check_adapter`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

from vistune.errors import ConfigError, VistuneError
from vistune.templates import Sample

#: Completion finished on an end-of-sequence token or a stop string.
FINISH_STOP = "stop"
#: Completion finished because ``max_tokens`` (or the context length) was reached.
FINISH_LENGTH = "length"
#: ``GenerationRequest.adapter`` that asks for the base model even where a default adapter is set.
BASE_ADAPTER = "__base__"


class RequestError(VistuneError):
    """A request the engine cannot serve as asked (too long, too many tokens, bad image).

    The server answers it with HTTP 400; ``param`` names the offending request field
    and ``code`` is a machine-readable reason (``context_length_exceeded``...).
    """

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.param = param
        self.code = code


class EngineClosedError(VistuneError):
    """The engine was closed while the request waited or ran."""


def _stop_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(s for s in value if s)


@attrs.frozen
class SamplingParams:
    """How to pick tokens for one request.  ``temperature == 0`` means greedy decoding."""

    max_tokens: int = attrs.field(default=128, validator=attrs.validators.ge(1))
    temperature: float = attrs.field(default=0.0, converter=float, validator=attrs.validators.ge(0))
    top_p: float = attrs.field(default=1.0, converter=float, validator=(attrs.validators.gt(0), attrs.validators.le(1)))
    #: Completions to draw for the prompt; they share one prefill.
    n: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    #: Strings that end a completion; the text stops before the first one found.
    stop: tuple[str, ...] = attrs.field(default=(), converter=_stop_tuple)
    #: Same seed, prompt and parameters give the same completions.  Completion ``i`` of
    #: ``n`` uses ``seed + i``.
    seed: int | None = None
    #: Keep generating past end-of-sequence tokens (benchmarks, fixed-length rollouts).
    ignore_eos: bool = False


@attrs.define
class GenerationRequest:
    """One prompt and how to complete it.

    ``prompt`` is a conversation (:class:`vistune.templates.Sample`, encoded with the
    model's template, images included), raw text (tokenized as is, no chat template),
    or token ids.  ``adapter`` names a LoRA adapter added with
    :meth:`Engine.add_adapter`; ``None`` uses the engine's default (the configured
    ``adapter_path``, if any, else the base model), :data:`BASE_ADAPTER` the base model.
    """

    prompt: Sample | str | list[int]
    sampling: SamplingParams = attrs.field(factory=SamplingParams)
    adapter: str | None = None
    request_id: str = attrs.field(factory=lambda: uuid.uuid4().hex)


@attrs.define
class CompletionOutput:
    """One of a request's ``n`` completions."""

    index: int
    text: str
    #: Generated token ids, including a final end-of-sequence token.
    token_ids: list[int]
    finish_reason: str


@attrs.define
class GenerationResult:
    """Everything generated for one request, with token usage."""

    request_id: str
    outputs: list[CompletionOutput]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    @property
    def text(self) -> str:
        """The first completion's text (the only one when ``n == 1``)."""
        return self.outputs[0].text


@attrs.frozen
class StreamEvent:
    """New output of one completion of a streamed request.

    ``text`` is what was added since the previous event of the same ``index`` (it may be
    empty on the final event).  The last event of each completion carries its
    ``finish_reason``; ``prompt_tokens`` is set on every event.
    """

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0


@runtime_checkable
class Engine(Protocol):
    """What a backend's factory returns (``Backend.factory(model_path, model_type, config)``).

    ``max_model_len`` is the longest prompt plus completion the engine accepts.
    """

    max_model_len: int

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Complete every request, batching them as the engine sees fit; results in request order.

        Blocks until all are done.  Thread-safe: several threads (and :meth:`stream`
        callers) may use the engine at once and share its batches.

        :raises RequestError: a request cannot be served (nothing is generated then).
        :raises vistune.errors.DataError: a conversation the template cannot encode.
        """

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Complete one request, yielding text as it is generated (an async generator).

        Errors in the request surface from the first ``__anext__``, before any event.
        Closing the iterator early (a client that went away) cancels the request.
        """

    def add_adapter(self, name: str, path: str) -> None:
        """Make the LoRA adapter in directory ``path`` available to requests as ``name``."""

    def close(self) -> None:
        """Stop the engine and free its memory; waiting requests fail with :class:`EngineClosedError`."""


def result_from_events(events: Iterable[StreamEvent], request_id: str = "") -> GenerationResult:
    """The :class:`GenerationResult` that a request's stream events add up to."""
    texts: dict[int, list[str]] = {}
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    prompt_tokens = 0
    for event in events:
        prompt_tokens = event.prompt_tokens or prompt_tokens
        texts.setdefault(event.index, []).append(event.text)
        tokens.setdefault(event.index, []).extend(event.token_ids)
        if event.finish_reason:
            reasons[event.index] = event.finish_reason
    outputs = [
        CompletionOutput(i, "".join(texts[i]), tokens.get(i, []), reasons.get(i, FINISH_STOP)) for i in sorted(texts)
    ]
    return GenerationResult(request_id, outputs, prompt_tokens)


async def collect(events: AsyncIterator[StreamEvent], request_id: str = "") -> GenerationResult:
    """Gather a stream into a :class:`GenerationResult` (token ids and text per completion)."""
    return result_from_events([event async for event in events], request_id)


def check_adapter(name: str | None, loaded: Iterable[str]) -> None:
    """Refuse a request naming an adapter the engine has not loaded.

    :raises RequestError: with code ``model_not_found`` (the server answers 400).
    """
    loaded = set(loaded)
    if name is not None and name != BASE_ADAPTER and name not in loaded:
        raise RequestError(f"unknown adapter {name!r}; loaded: {', '.join(sorted(loaded)) or 'none'}",
                           param="model", code="model_not_found")  # fmt: skip


def check_adapter_dir(path: str) -> None:
    """Refuse a directory :meth:`Engine.add_adapter` cannot load.

    :raises ConfigError: unless ``path`` holds a peft adapter (``adapter_config.json``).
    """
    if not (Path(path) / "adapter_config.json").is_file():
        raise ConfigError(f"{path} is not a peft adapter directory (no adapter_config.json)",
                          hint="point adapter_path at the directory `vistune sft` saved")  # fmt: skip


def adapter_to_use(request: GenerationRequest, default: str | None) -> str | None:
    """The adapter a request runs with: its own, else the engine's ``default``; ``None`` for the base model."""
    name = request.adapter or default
    return None if name == BASE_ADAPTER else name


def check_context(prompt_tokens: int, sampling: SamplingParams, max_model_len: int) -> None:
    """Refuse a prompt that leaves no room for ``sampling.max_tokens`` new tokens.

    Every engine applies the same rule to its own context length, so clients get the same
    error from every backend: prompt plus ``max_tokens`` must fit in ``max_model_len``.

    :raises RequestError: with code ``context_length_exceeded``.
    """
    if prompt_tokens >= max_model_len:
        raise RequestError(
            f"the prompt is {prompt_tokens} tokens long, but the model's context holds {max_model_len} tokens "
            "(prompt and completion together)",
            param="messages",
            code="context_length_exceeded",
            hint="shorten the prompt",
        )
    if prompt_tokens + sampling.max_tokens > max_model_len:
        raise RequestError(
            f"this model's maximum context length is {max_model_len} tokens, but {prompt_tokens + sampling.max_tokens} "
            f"were requested ({prompt_tokens} in the prompt, {sampling.max_tokens} for the completion)",
            param="max_tokens",
            code="context_length_exceeded",
            hint=f"ask for at most {max_model_len - prompt_tokens} tokens",
        )


