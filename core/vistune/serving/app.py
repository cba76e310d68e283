"""The OpenAI-compatible HTTP application: /v1/models, /v1/completions, /v1/chat/completions.

Requests are turned into :class:`vistune.inference.GenerationRequest` and answered
from the engine's :meth:`~vistune.inference.Engine.stream`, so every backend serves
streaming and non-streaming requests the same way.  Streams are sent as server-sent
events ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from vistune.inference.batch_size import batch_size_of
from vistune.inference.engine import (
    Engine,
    EngineClosedError,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StreamEvent,
    collect,
    result_from_events,
)
from vistune.inference.engine_stats import DESCRIPTIONS
from vistune.serving.errors import APIError, bad_request, error_body, install_error_handlers
from vistune.serving.limits import Admission
from vistune.serving.media import MediaPolicy, load_image
from vistune.serving.prometheus import CONTENT_TYPE, Metric, engine_metrics, render
from vistune.serving.schemas import ChatCompletionRequest, CompletionRequest, parse_body, read_body
from vistune.templates import IMAGE_TAG, Sample

#: Paths answered without an API key: load balancers probe /health, Prometheus scrapes /metrics
#: (counts and timings only, no prompt or answer; as vLLM's /metrics).
PUBLIC_PATHS = ("/health", "/metrics")
#: Images in one chat request.  Each may have up to ``max_image_pixels`` pixels, and all of
#: a request's images are decoded before the model sees them: this bounds that memory.
MAX_IMAGES = 16
#: Characters per token no real prompt averages over a whole context: a prompt longer
#: than ``max_model_len`` times this many characters cannot fit, and is refused before it
#: is tokenised (tokenising tens of megabytes takes minutes and gigabytes).  Natural
#: language averages about 4 characters per token, code and other scripts fewer; only
#: text made almost entirely of tokens longer than 32 characters (long runs of one
#: character, in some vocabularies) could fit beyond it.
MAX_CHARS_PER_TOKEN = 32


def resolve_api_key(config: Any) -> str | None:
    """The bearer token requests must carry: ``api_key`` in the config, else ``$VISTUNE_API_KEY``."""
    return config.api_key or os.environ.get("VISTUNE_API_KEY") or None


def _sampling(body: Any, config: Any, max_tokens: int | None) -> SamplingParams:
    """A request's sampling; what it leaves unset comes from the config (temperature: else 1.0, as OpenAI's)."""
    default_temperature = 1.0 if config.temperature is None else config.temperature
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else config.max_new_tokens,
        temperature=default_temperature if body.temperature is None else body.temperature,
        top_p=config.top_p if body.top_p is None else body.top_p,
        n=body.n,
        stop=body.stop_strings(),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


async def messages_to_sample(messages: list[Any], policy: MediaPolicy) -> Sample:
    """OpenAI chat messages -> a :class:`Sample`; each image part becomes an ``<image>`` tag.

    Parts of one message are joined with newlines, as the Llava prompt format writes
    ``<image>\\n`` before the question.  Images are loaded under ``policy``.
    """
    count = sum(1 for m in messages if isinstance(m.content, list) for part in m.content if part.type == "image_url")
    if count > MAX_IMAGES:  # refused before any is fetched or decoded
        raise bad_request(f"at most {MAX_IMAGES} images per request are supported, got {count}", "messages",
                          "too_many_images")  # fmt: skip
    converted, images = [], []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            pieces = []
            for j, part in enumerate(content):
                if part.type == "text":
                    pieces.append(part.text)
                    continue
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append(await load_image(url, policy, param=f"messages.{i}.content.{j}.image_url"))
                pieces.append(IMAGE_TAG)
            text = "\n".join(pieces)
        converted.append({"role": role, "content": text})
    return Sample(converted, images, source="request")


def message_chars(messages: list[Any]) -> int:
    """Characters of text in chat messages (image parts not counted)."""
    total = 0
    for message in messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content:
            total += sum(len(part.text) for part in message.content if part.type == "text")
    return total


def check_prompt_chars(chars: int, max_model_len: int, param: str) -> None:
    """Refuse a prompt of ``chars`` characters that cannot fit the context, without tokenising it.

    :raises APIError: 400 ``context_length_exceeded``, as the engine answers a prompt
        found too long once tokenised.
    """
    limit = max_model_len * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise APIError(400, f"the prompt is {chars} characters long, more than the {limit} that can fit the "
                       f"model's context of {max_model_len} tokens ({MAX_CHARS_PER_TOKEN} characters per token "
                       "at most); shorten the prompt", param=param, code="context_length_exceeded")  # fmt: skip


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _merged(streams: list[AsyncIterator[StreamEvent]]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """Events of several streams as they come, tagged with the stream's position.

    Each stream is iterated by a task of its own; when the merged stream ends early (an
    error in one stream, a client that went away) the tasks are cancelled, which raises
    inside the streams they iterate and so cancels their requests in the engine.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(k: int, stream: AsyncIterator[StreamEvent]) -> None:
        try:
            async for event in stream:
                await queue.put((k, event))
            await queue.put((k, done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((k, exc))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            k, item = await queue.get()
            if item is done:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for task in tasks:
            task.cancel()
        # A stream being iterated cannot be closed from outside (aclose() raises): wait for its task instead.
        await asyncio.gather(*tasks, return_exceptions=True)


class _Generation:
    """One HTTP request's generation: its engine streams, each one's first event already pulled.

    Pulling the first event of every prompt before answering makes request errors (a
    prompt too long, a bad image for the model) come back as a 4xx status instead of
    inside a 200 stream, whichever of the request's prompts they concern.
    """

    def __init__(self, events: AsyncIterator[tuple[int, StreamEvent]], first: list[tuple[int, StreamEvent]]):
        self.events = events
        self.first = first

    @classmethod
    async def start(cls, engine: Engine, requests: list[GenerationRequest]) -> _Generation:
        events = _merged([engine.stream(r) for r in requests])
        first: list[tuple[int, StreamEvent]] = []
        try:
            while len({k for k, _ in first}) < len(requests):
                first.append(await events.__anext__())
        except StopAsyncIteration:
            pass
        except BaseException:
            await events.aclose()
            raise
        return cls(events, first)

    async def __aiter__(self) -> AsyncIterator[tuple[int, StreamEvent]]:
        for item in self.first:
            yield item
        async for item in self.events:
            yield item

    async def aclose(self) -> None:
        await self.events.aclose()


def create_app(engine: Engine, config: Any, *, model_name: str, owns_engine: bool = True,
               admission: Admission | None = None) -> FastAPI:  # fmt: skip
    """The FastAPI application serving ``engine`` as ``model_name``.

    :param config: the run's :class:`vistune.config.RunConfig` (limits, media policy,
        API key, defaults for sampling).
    :param owns_engine: close the engine when the application shuts down.
    :param admission: the in-flight limit (default: ``max_batch_size + max_queue``, with
        the engine's own batch size for ``max_batch_size: auto``); also reachable as
        ``app.state.admission``.
    """
    admission = admission or Admission(batch_size_of(engine, config) + config.max_queue)
    policy = MediaPolicy.from_config(config)
    api_key = resolve_api_key(config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        admission.start_draining()
        await admission.wait_idle(timeout=30)
        if owns_engine:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="vistune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.admission = admission
    app.state.model_name = model_name
    install_error_handlers(app)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key and request.url.path not in PUBLIC_PATHS:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
                error = APIError(401, "invalid or missing API key; send it as 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")  # fmt: skip
                return JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           type="not_found_error", param="model", code="model_not_found")  # fmt: skip

    @app.get("/health")
    async def health():
        if admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "in_flight": admission.in_flight}

    media = {"images": 0, "seconds": 0.0}  # images of chat requests, and the time spent loading them

    @app.get("/metrics")
    async def metrics():
        """Counters in the Prometheus text format, open without the API key (as vLLM's /metrics): they carry
        counts and timings, nothing of a prompt or an answer.

        The server's own (``vistune_http_...``: requests admitted, refused with 429, in flight, images
        loaded and the seconds it took), then the engine's ``stats()`` as ``vistune_engine_..._total``
        (see :mod:`vistune.inference.engine_stats`); an engine without ``stats()`` adds none.
        """
        served = [
            Metric("vistune_http_requests_admitted_total", "counter", "requests let in by the admission limit",
                   admission.admitted),
            Metric("vistune_http_requests_refused_total", "counter",
                   "requests answered 429 because max_batch_size + max_queue were in flight", admission.refused),
            Metric("vistune_http_requests_in_flight", "gauge", "requests admitted and not yet answered",
                   admission.in_flight),
            Metric("vistune_http_images_total", "counter", "images of chat requests fetched and decoded",
                   media["images"]),
            Metric("vistune_http_image_seconds_total", "counter",
                   "seconds spent fetching and decoding the images of chat requests", media["seconds"]),
        ]  # fmt: skip
        stats = getattr(engine, "stats", None)
        found = engine_metrics(await asyncio.to_thread(stats), DESCRIPTIONS) if callable(stats) else []
        return PlainTextResponse(render(served + found), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "vistune", "max_model_len": engine.max_model_len}]}  # fmt: skip

    async def admitted(handler, request: Request):
        """Read the body of ``request``, then run ``handler(body)`` inside the admission limit.

        The body is read first, within :data:`~vistune.serving.schemas.BODY_READ_TIMEOUT_S`,
        so a client that is slow to send it never holds a place others need.  A stream
        leaves the limit when it ends.
        """
        raw = await read_body(request)
        admission.enter()
        try:
            response = await handler(raw)
        except BaseException:
            admission.leave()
            raise
        if isinstance(response, StreamingResponse):
            return response  # its body iterator calls admission.leave()
        admission.leave()
        return response

    def streaming(generation: _Generation, chunks) -> StreamingResponse:
        async def body():
            try:
                try:
                    async for chunk in chunks(generation):
                        yield chunk
                except Exception as exc:  # noqa: BLE001 - the status line is sent: report it in the stream
                    kind = "service_unavailable" if isinstance(exc, EngineClosedError) else "server_error"
                    yield _sse(error_body(f"generation failed: {exc}", type=kind))
                yield b"data: [DONE]\n\n"
            finally:
                admission.leave()  # first: the await below may be cancelled when the client went away
                await generation.aclose()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- chat completions --------------------------------------------------------------

    async def chat(raw: bytes):
        body = parse_body(raw, ChatCompletionRequest)
        check_model(body.model)
        if (
            body.max_tokens is not None
            and body.max_completion_tokens is not None
            and body.max_tokens != body.max_completion_tokens
        ):
            raise bad_request("max_tokens and max_completion_tokens disagree; set one", "max_completion_tokens")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sampling = _sampling(body, config, max_tokens)
        check_prompt_chars(message_chars(body.messages), engine.max_model_len, "messages")
        started = time.perf_counter()
        sample = await messages_to_sample(body.messages, policy)
        if sample.images:
            media["images"] += len(sample.images)
            media["seconds"] += time.perf_counter() - started
        generation = await _Generation.start(engine, [GenerationRequest(sample, sampling)])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": model_name, "system_fingerprint": None}
        if not body.stream:
            result = await collect((event async for _, event in generation), rid)
            return _chat_response(head, result)

        async def chunks(gen: _Generation):
            def chunk(choices, usage=None):
                data = {**head, "object": "chat.completion.chunk", "choices": choices}
                if body.include_usage():
                    data["usage"] = usage
                return _sse(data)

            for i in range(body.n):
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            prompt_tokens, completion_tokens = 0, 0
            async for _, event in gen:
                prompt_tokens = event.prompt_tokens
                completion_tokens += len(event.token_ids)
                if not event.text and not event.finish_reason:
                    continue
                delta = {"content": event.text} if event.text else {}
                yield chunk(
                    [{"index": event.index, "delta": delta, "logprobs": None, "finish_reason": event.finish_reason}]
                )
            if body.include_usage():
                yield chunk([], _usage(prompt_tokens, completion_tokens))

        return streaming(generation, chunks)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await admitted(chat, request)

    # -- text completions --------------------------------------------------------------

    async def complete(raw: bytes):
        body = parse_body(raw, CompletionRequest)
        check_model(body.model)
        sampling = _sampling(body, config, body.max_tokens)
        prompts = body.prompts()
        for prompt in prompts:
            if isinstance(prompt, str):
                check_prompt_chars(len(prompt), engine.max_model_len, "prompt")
        requests = [GenerationRequest(prompt, sampling) for prompt in prompts]
        generation = await _Generation.start(engine, requests)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "system_fingerprint": None,
        }
        n = body.n
        if not body.stream:
            per_prompt: dict[int, list[StreamEvent]] = {}
            async for k, event in generation:
                per_prompt.setdefault(k, []).append(event)
            results = [result_from_events(per_prompt.get(k, []), rid) for k in range(len(prompts))]
            return _completion_response(head, results, n)

        async def chunks(gen: _Generation):
            prompt_tokens: dict[int, int] = {}
            completion_tokens = 0
            async for k, event in gen:
                prompt_tokens[k] = event.prompt_tokens
                completion_tokens += len(event.token_ids)
                if not event.text and not event.finish_reason:
                    continue
                choice = {
                    "index": k * n + event.index,
                    "text": event.text,
                    "logprobs": None,
                    "finish_reason": event.finish_reason,
                }
                data = {**head, "choices": [choice]}
                if body.include_usage():
                    data["usage"] = None
                yield _sse(data)
            if body.include_usage():
                yield _sse({**head, "choices": [], "usage": _usage(sum(prompt_tokens.values()), completion_tokens)})

        return streaming(generation, chunks)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await admitted(complete, request)

    return app


def _chat_response(head: dict[str, Any], result: GenerationResult) -> dict[str, Any]:
    choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
                "finish_reason": o.finish_reason} for o in result.outputs]  # fmt: skip
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": _usage(result.prompt_tokens, result.completion_tokens)}  # fmt: skip


def _completion_response(head: dict[str, Any], results: list[GenerationResult], n: int) -> dict[str, Any]:
    choices = [{"index": k * n + o.index, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
               for k, result in enumerate(results) for o in result.outputs]  # fmt: skip
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}
