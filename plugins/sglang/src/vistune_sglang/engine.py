"""The ``sglang`` backend: :class:`vistune.inference.Engine` over SGLang's offline ``sglang.Engine``.

SGLang's engine is bound to the asyncio loop current when it is built: its tokenizer
manager runs there.  The engine is built on a fresh loop which then runs in a
background thread; the blocking :meth:`SglangEngine.generate` and the async
:meth:`SglangEngine.stream` hand their coroutines to that loop, so any thread or event
loop can share SGLang's batches.  Prompts are encoded with vistune's template and sent
as token ids (image runs collapsed to one placeholder each) with the images.

This module runs only on a CUDA machine with sglang installed (see README.md).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from vistune.errors import ConfigError
from vistune.inference.engine import (
    CompletionOutput,
    EngineClosedError,
    GenerationRequest,
    GenerationResult,
    RequestError,
    StreamEvent,
    check_context,
)
from vistune.inference.prompts import collapse_image_tokens, image_token_id, prompt_ids_and_images

from vistune_sglang.translate import CumulativeOutput, engine_kwargs, finish_reason, generate_kwargs, sampling_params


def _load_processor(model_path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, TypeError):
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


class SglangEngine:
    """:class:`vistune.inference.Engine` backed by SGLang.

    :param config: the run's :class:`vistune.config.RunConfig`: ``tensor_parallel_size``
        (``tp_size``), ``gpu_memory_utilization`` (``mem_fraction_static``),
        ``quantization``, ``dtype``, ``max_length`` (``context_length``, capped by the
        model's), ``max_batch_size`` (``max_running_requests``), ``adapter_path`` (the
        default LoRA adapter).
    """

    def __init__(self, model_path: str, model_type: Any, config: Any):
        import sglang
        from vistune.plugins import get_plugin_manager
        from vistune.specs import load_ref
        from vistune.templates import TemplateOptions

        model_path = str(model_path)
        hf_config = json.loads((Path(model_path) / "config.json").read_text())
        text_config = hf_config.get("text_config") or hf_config
        model_len = text_config.get("max_position_embeddings") or hf_config.get("max_position_embeddings")
        self.max_model_len = min(config.max_length, model_len) if model_len else config.max_length
        self._image_token = image_token_id(hf_config)
        processor = _load_processor(model_path, config.trust_remote_code)
        self.tokenizer = getattr(processor, "tokenizer", None) or processor
        template = get_plugin_manager().registries.templates.get(config.template or model_type.default_template)
        self.encoder = load_ref(template.factory)(
            processor, TemplateOptions(max_length=self.max_model_len, truncation="error")
        )
        self._adapters: dict[str, str] = {}
        self._default_adapter: str | None = None
        if config.adapter_path:
            self._check_adapter(config.adapter_path)
            self._adapters["default"] = str(config.adapter_path)
            self._default_adapter = "default"
        kwargs = engine_kwargs(model_path, config, context_length=self.max_model_len, lora_paths=self._adapters)
        self._loop = asyncio.new_event_loop()
        previous = _current_loop()
        asyncio.set_event_loop(self._loop)  # sglang.Engine binds to the current loop
        try:
            self._engine = sglang.Engine(**kwargs)
        finally:
            asyncio.set_event_loop(previous)
        self._thread = threading.Thread(target=self._loop.run_forever, name="vistune-sglang", daemon=True)
        self._thread.start()
        self._closed = False

    @staticmethod
    def _check_adapter(path: str) -> None:
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"{path} is not a peft adapter directory (no adapter_config.json)")

    # -- requests ----------------------------------------------------------------------

    def _prepare(self, request: GenerationRequest) -> tuple[list[int], list[Any], int]:
        if self._closed:
            raise EngineClosedError("the engine is closed")
        ids, images = prompt_ids_and_images(request.prompt, self.encoder, self.tokenizer)
        check_context(len(ids), request.sampling, self.max_model_len)
        if request.adapter not in (None, "__base__") and request.adapter not in self._adapters:
            raise RequestError(f"unknown adapter {request.adapter!r}; loaded: {', '.join(self._adapters) or 'none'}",
                               param="model", code="model_not_found")  # fmt: skip
        prompt_ids = collapse_image_tokens(ids, self._image_token) if images else ids
        return prompt_ids, images, len(ids)

    def _lora_name(self, request: GenerationRequest) -> str | None:
        name = request.adapter or self._default_adapter
        return None if name in (None, "__base__") else name

    async def _one(self, request: GenerationRequest, ids: list[int], images: list[Any], index: int) -> CompletionOutput:
        output = await self._engine.async_generate(
            sampling_params=sampling_params(request.sampling, index),
            **generate_kwargs(ids, images, self._lora_name(request), stream=False),
        )
        return CompletionOutput(index, output["text"], list(output.get("output_ids") or []),
                                finish_reason(output["meta_info"]) or "length")  # fmt: skip

    # -- Engine --------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Complete ``requests`` in SGLang's batches; blocks until all are done."""
        prepared = [self._prepare(request) for request in requests]

        async def run_all():
            groups = [asyncio.gather(*[self._one(r, ids, images, i) for i in range(r.sampling.n)])
                      for r, (ids, images, _) in zip(requests, prepared)]  # fmt: skip
            return await asyncio.gather(*groups)

        outputs = asyncio.run_coroutine_threadsafe(run_all(), self._loop).result()
        return [GenerationResult(r.request_id, list(o), n) for r, o, (_, _, n) in zip(requests, outputs, prepared)]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Yield text as SGLang generates it; closing the iterator aborts the request."""
        caller = asyncio.get_running_loop()
        ids, images, prompt_tokens = await caller.run_in_executor(None, self._prepare, request)
        queue: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                caller.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                pass

        async def pump(index: int) -> None:
            try:
                chunks = await self._engine.async_generate(
                    sampling_params=sampling_params(request.sampling, index),
                    **generate_kwargs(ids, images, self._lora_name(request), stream=True),
                )
                cumulative = CumulativeOutput()
                async for chunk in chunks:
                    text, new_ids = cumulative.delta(chunk)
                    put(StreamEvent(index, text, tuple(new_ids), finish_reason(chunk["meta_info"]), prompt_tokens))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(exc)

        futures = [asyncio.run_coroutine_threadsafe(pump(i), self._loop) for i in range(request.sampling.n)]
        unfinished = request.sampling.n
        try:
            while unfinished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason:
                    unfinished -= 1
                yield item
        finally:
            if unfinished:
                for future in futures:
                    future.cancel()  # cancelling the generator task aborts the request in SGLang

    def add_adapter(self, name: str, path: str) -> None:
        """Load the LoRA adapter in ``path`` into SGLang as ``name``."""
        self._check_adapter(path)
        if not self._adapters:
            raise ConfigError("the sglang engine was started without LoRA support",
                              hint="set adapter_path in the config, which starts SGLang with enable_lora")  # fmt: skip

        asyncio.run_coroutine_threadsafe(self._engine.async_load_lora_adapter(name, str(path)), self._loop).result()
        self._adapters[name] = str(path)

    def close(self) -> None:
        """Shut SGLang's processes down and stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._engine.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)


def _current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        return None
