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
import contextlib
import functools
from collections.abc import AsyncIterator, Sequence
from typing import Any

from vistune.errors import ConfigError
from vistune.inference.background_loop import BackgroundLoop, Emit
from vistune.inference.engine import (
    CompletionOutput,
    EngineClosedError,
    GenerationRequest,
    GenerationResult,
    StreamEvent,
    adapter_to_use,
    check_adapter_dir,
)
from vistune.inference.prompts import CheckpointPrompts

from vistune_sglang.translate import CumulativeOutput, engine_kwargs, finish_reason, generate_kwargs, sampling_params


class SglangEngine:
    """:class:`vistune.inference.Engine` backed by SGLang.

    :param config: the run's :class:`vistune.config.RunConfig`: ``tensor_parallel_size``
        (``tp_size``), ``gpu_memory_utilization`` (``mem_fraction_static``),
        ``quantization``, ``dtype``, ``max_length`` (``context_length``, capped by the
        model's), ``max_batch_size`` (``max_running_requests``; ``auto`` leaves SGLang's own),
        ``adapter_path`` (the default LoRA adapter).
    """

    def __init__(self, model_path: str, model_type: Any, config: Any):
        import sglang

        model_path = str(model_path)
        self._prompts = CheckpointPrompts(model_path, model_type, config)
        self.max_model_len = self._prompts.max_model_len
        self.tokenizer, self.encoder = self._prompts.tokenizer, self._prompts.encoder
        self._adapters: dict[str, str] = {}
        self._default_adapter: str | None = None
        if config.adapter_path:
            check_adapter_dir(config.adapter_path)
            self._adapters["default"] = str(config.adapter_path)
            self._default_adapter = "default"
        kwargs = engine_kwargs(model_path, config, context_length=self.max_model_len, lora_paths=self._adapters)
        self._loop = BackgroundLoop("vistune-sglang")
        previous = _current_loop()
        asyncio.set_event_loop(self._loop.loop)  # sglang.Engine binds to the current loop
        try:
            self._engine = sglang.Engine(**kwargs)
        finally:
            asyncio.set_event_loop(previous)
        self._loop.start()
        self._closed = False

    # -- requests ----------------------------------------------------------------------

    def _prepare(self, request: GenerationRequest) -> tuple[list[int], list[Any], int]:
        if self._closed:
            raise EngineClosedError("the engine is closed")
        return self._prompts.encode(request, self._adapters, self.max_model_len)

    async def _one(self, request: GenerationRequest, ids: list[int], images: list[Any], index: int) -> CompletionOutput:
        output = await self._engine.async_generate(
            sampling_params=sampling_params(request.sampling, index),
            **generate_kwargs(ids, images, adapter_to_use(request, self._default_adapter), stream=False),
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

        outputs = self._loop.run(run_all())
        return [GenerationResult(r.request_id, list(o), n) for r, o, (_, _, n) in zip(requests, outputs, prepared)]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Yield text as SGLang generates it; closing the iterator aborts the request."""
        ids, images, prompt_tokens = await asyncio.get_running_loop().run_in_executor(None, self._prepare, request)

        async def produce(index: int, emit: Emit) -> None:  # cancelling it aborts the request in SGLang
            chunks = await self._engine.async_generate(
                sampling_params=sampling_params(request.sampling, index),
                **generate_kwargs(ids, images, adapter_to_use(request, self._default_adapter), stream=True),
            )
            cumulative = CumulativeOutput()
            async for chunk in chunks:
                text, new_ids = cumulative.delta(chunk)
                emit(StreamEvent(index, text, tuple(new_ids), finish_reason(chunk["meta_info"]), prompt_tokens))

        producers = [functools.partial(produce, i) for i in range(request.sampling.n)]
        async with contextlib.aclosing(self._loop.relay(producers, request.sampling.n)) as events:
            async for event in events:
                yield event

    def add_adapter(self, name: str, path: str) -> None:
        """Load the LoRA adapter in ``path`` into SGLang as ``name``."""
        check_adapter_dir(path)
        if not self._adapters:
            raise ConfigError("the sglang engine was started without LoRA support",
                              hint="set adapter_path in the config, which starts SGLang with enable_lora")  # fmt: skip
        self._loop.run(self._engine.async_load_lora_adapter(name, str(path)))
        self._adapters[name] = str(path)

    def close(self) -> None:
        """Shut SGLang's processes down and stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._engine.shutdown()
        finally:
            self._loop.stop()


def _current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        return None
