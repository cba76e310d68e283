"""The ``vllm`` backend: :class:`vistune.inference.Engine` over vLLM's ``AsyncLLM``.

One ``AsyncLLM`` serves both the blocking batched :meth:`VllmEngine.generate` (offline
inference, RL rollouts) and the async :meth:`VllmEngine.stream` (the server): it runs on
an event loop of its own, in a background thread, so callers on any thread or loop can
share its continuous batching.  Prompts are encoded with vistune's template (the model
sees exactly what it was trained on) and handed over as token ids, with the images of
vision prompts as ``multi_modal_data``.

For RL rollouts (:meth:`VllmEngine.from_model`) vLLM keeps its own copy of the policy's
weights, which :meth:`VllmEngine.update_weights` brings up to date before every rollout:
a LoRA policy's adapter is saved and loaded as a new vLLM LoRA adapter; the weights of any
other policy (full fine-tuning, DoRA, an adapter with ``modules_to_save``) are saved merged,
and vLLM reloads them in place.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import shutil
import tempfile
import threading
import uuid
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

from vistune_vllm.translate import engine_kwargs, sampling_kwargs

#: LoRA ranks vLLM kernels are built for; the engine's maximum is rounded up to one of them.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _load_processor(model_path: str, trust_remote_code: bool) -> Any:
    """The checkpoint's processor (vision models) or tokenizer, without loading weights."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, TypeError):
        # e.g. processors that insist on a video processor (torchvision) for an image-only use
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def _lora_rank(path: str) -> int:
    try:
        rank = int(json.loads((Path(path) / "adapter_config.json").read_text()).get("r", 8))
    except (OSError, ValueError):
        return LORA_RANKS[0]
    return _kernel_rank(rank)


def _kernel_rank(rank: int) -> int:
    return next((r for r in LORA_RANKS if r >= rank), rank)


def _syncs_as_lora(model: Any) -> bool:
    """Whether vLLM can run the policy's active adapter as a LoRA adapter of its own."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return False
    config = configs[model.active_adapter]
    return (getattr(config, "peft_type", None) == "LORA" and not getattr(config, "use_dora", False)
            and not getattr(config, "modules_to_save", None))  # fmt: skip


def _merged_state_dict(model: Any) -> dict[str, Any]:
    """The policy's weights under the base checkpoint's names, a peft adapter merged in."""
    if not hasattr(model, "peft_config"):
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    model.merge_adapter()
    try:
        state = {}
        for name, tensor in model.state_dict().items():
            if model.prefix in name or "original_module" in name:
                continue  # the adapter's own tensors (merged already), and the copy modules_to_save replaces
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            name = name.replace(f".modules_to_save.{model.active_adapter}", "")
            state[name] = tensor.detach().to("cpu", copy=True)  # unmerged below
    finally:
        model.unmerge_adapter()
    return state


def _finish_reason(reason: str | None) -> str | None:
    if reason == "abort":
        raise EngineClosedError("vLLM aborted the request")
    return reason


class VllmEngine:
    """:class:`vistune.inference.Engine` backed by vLLM.

    :param model_path: local checkpoint directory.
    :param model_type: the :class:`vistune.specs.ModelType` (its default template encodes prompts).
    :param config: the run's :class:`vistune.config.RunConfig`: ``tensor_parallel_size``,
        ``gpu_memory_utilization``, ``quantization``, ``dtype``, ``max_length`` (vLLM's
        ``max_model_len``, capped by the model's), ``max_batch_size`` (``max_num_seqs``),
        ``adapter_path`` (served as the default LoRA adapter).
    """

    def __init__(
        self, model_path: str, model_type: Any, config: Any, *, encoder: Any = None, lora_rank: int | None = None
    ):
        import vllm
        from vistune.plugins import get_plugin_manager
        from vistune.specs import load_ref
        from vistune.templates import TemplateOptions
        from vllm.lora.request import LoRARequest

        self._vllm = vllm
        self._lora_request = LoRARequest
        model_path = str(model_path)
        hf_config = json.loads((Path(model_path) / "config.json").read_text())
        text_config = hf_config.get("text_config") or hf_config
        model_len = text_config.get("max_position_embeddings") or hf_config.get("max_position_embeddings")
        max_model_len = min(config.max_length, model_len) if model_len else config.max_length
        self._image_token = image_token_id(hf_config)
        processor = _load_processor(model_path, config.trust_remote_code)
        self.tokenizer = getattr(processor, "tokenizer", None) or processor
        if encoder is None:
            template = get_plugin_manager().registries.templates.get(config.template or model_type.default_template)
            options = TemplateOptions(max_length=max_model_len, truncation="error")
            encoder = load_ref(template.factory)(processor, options)
        self.encoder = encoder
        #: Requests are queued beyond this; RL raises it to a rollout's size (informational for vLLM).
        self.max_batch_size = max(config.max_batch_size, 1)
        enable_lora = bool(config.adapter_path) or lora_rank is not None
        kwargs = engine_kwargs(model_path, config, max_model_len=max_model_len, enable_lora=enable_lora)
        if enable_lora:
            kwargs["max_lora_rank"] = _kernel_rank(lora_rank) if lora_rank else _lora_rank(config.adapter_path)
        if not _cuda_available():
            kwargs["enforce_eager"] = True  # no CUDA graphs to capture; starts faster
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vistune-vllm", daemon=True)
        self._thread.start()
        self._closed = False
        self._weights_dir: tempfile.TemporaryDirectory | None = None
        self._weight_version = 0
        self._adapters: dict[str, Any] = {}
        self._adapter_ids = itertools.count(1)
        self._default_adapter: str | None = None
        self._lora_enabled = enable_lora
        args = vllm.AsyncEngineArgs(**kwargs)

        async def create():
            return vllm.AsyncLLMEngine.from_engine_args(args)

        try:
            self._llm = asyncio.run_coroutine_threadsafe(create(), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise
        self.max_model_len = int(self._llm.model_config.max_model_len)
        if config.adapter_path:
            self.add_adapter("default", config.adapter_path)
            self._default_adapter = "default"

    @classmethod
    def from_model(cls, model: Any, processor: Any, encoder: Any, *, max_batch_size: int, config: Any) -> VllmEngine:
        """An engine sampling RL rollouts from ``model``, the policy being trained.

        vLLM starts from the policy's base checkpoint directory and is brought up to date
        with the policy at once (see :meth:`update_weights`).  Requests naming the policy's
        active adapter sample from the policy.  One process only: under torchrun every
        process's vLLM would claim the same GPU.
        """
        import attrs
        import torch

        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            raise ConfigError("the vllm backend samples RL rollouts in single-process runs only",
                              hint="set backend: transformers for gpu_num > 1")  # fmt: skip
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        model_path = getattr(base, "name_or_path", "") or ""
        if not (Path(model_path) / "config.json").is_file():
            raise ConfigError(f"the vllm backend needs the policy's checkpoint directory, but the model names "
                              f"{model_path!r}", hint="set backend: transformers")  # fmt: skip
        lora_rank = model.peft_config[model.active_adapter].r if _syncs_as_lora(model) else None
        # an SFT adapter the run continues is the policy's own adapter here, synced below, not a served one
        config = attrs.evolve(config, adapter_path=None, max_batch_size=max(config.max_batch_size, max_batch_size))
        engine = cls(model_path, None, config, encoder=encoder, lora_rank=lora_rank)
        try:
            engine.update_weights(model)
        except BaseException:
            engine.close()
            raise
        return engine

    def update_weights(self, model: Any) -> None:
        """Make requests naming ``model``'s active adapter (or none) sample from ``model`` as it is now."""
        if self._weights_dir is None:
            self._weights_dir = tempfile.TemporaryDirectory(prefix="vistune-vllm-weights-")
        previous = Path(self._weights_dir.name) / f"v{self._weight_version}"
        self._weight_version += 1
        path = Path(self._weights_dir.name) / f"v{self._weight_version}"
        if _syncs_as_lora(model):
            name = model.active_adapter
            model.save_pretrained(str(path), selected_adapters=[name])
            adapter_dir = path if name == "default" else path / name  # peft saves other adapters in a subfolder
            old = self._adapters.get(name)
            # a new id: vLLM caches an adapter's weights (and prefix KV) by id
            self._adapters[name] = self._lora_request(name, next(self._adapter_ids), str(adapter_dir))
            if old is not None:
                asyncio.run_coroutine_threadsafe(self._llm.remove_lora(old.lora_int_id), self._loop).result()
        else:
            from safetensors.torch import save_file

            path.mkdir(parents=True)
            save_file(_merged_state_dict(model), str(path / "model.safetensors"))
            if hasattr(model, "peft_config"):
                self._adapters[model.active_adapter] = None  # the merged policy is vLLM's base model now

            async def reload():
                await self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
                await self._llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

            asyncio.run_coroutine_threadsafe(reload(), self._loop).result()
        shutil.rmtree(previous, ignore_errors=True)

    # -- requests ------------------------------------------------------------------------

    def _prepare(self, request: GenerationRequest) -> tuple[dict[str, Any], int]:
        """vLLM's prompt (token ids, images) and its length in tokens as the model sees it."""
        if self._closed:
            raise EngineClosedError("the engine is closed")
        ids, images = prompt_ids_and_images(request.prompt, self.encoder, self.tokenizer)
        check_context(len(ids), request.sampling, self.max_model_len)
        if request.adapter is not None and request.adapter != "__base__" and request.adapter not in self._adapters:
            raise RequestError(f"unknown adapter {request.adapter!r}; loaded: {', '.join(self._adapters) or 'none'}",
                               param="model", code="model_not_found")  # fmt: skip
        engine_prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if images:
            engine_prompt = {"prompt_token_ids": collapse_image_tokens(ids, self._image_token),
                             "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}  # fmt: skip
        return engine_prompt, len(ids)

    def _params(self, request: GenerationRequest, *, stream: bool) -> Any:
        from vllm.sampling_params import RequestOutputKind

        kwargs = sampling_kwargs(request.sampling, stream=stream)
        kwargs["output_kind"] = getattr(RequestOutputKind, kwargs["output_kind"])
        return self._vllm.SamplingParams(**kwargs)

    def _lora(self, request: GenerationRequest) -> Any:
        name = request.adapter or self._default_adapter
        return None if name in (None, "__base__") else self._adapters[name]

    async def _final(self, request: GenerationRequest, prompt: dict[str, Any], prompt_tokens: int) -> GenerationResult:
        final = None
        async for output in self._llm.generate(prompt, self._params(request, stream=False), uuid.uuid4().hex,
                                               lora_request=self._lora(request)):  # fmt: skip
            final = output
        outputs = [CompletionOutput(o.index, o.text, list(o.token_ids), _finish_reason(o.finish_reason) or "length")
                   for o in sorted(final.outputs, key=lambda o: o.index)]  # fmt: skip
        return GenerationResult(request.request_id, outputs, prompt_tokens)

    # -- Engine ----------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Complete ``requests`` together in vLLM's batch; blocks until all are done."""
        prepared = [self._prepare(request) for request in requests]

        async def run_all():
            return await asyncio.gather(*[self._final(r, p, n) for r, (p, n) in zip(requests, prepared)])

        return asyncio.run_coroutine_threadsafe(run_all(), self._loop).result()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Yield text as vLLM generates it; closing the iterator aborts the request in vLLM."""
        caller = asyncio.get_running_loop()
        prompt, prompt_tokens = await caller.run_in_executor(None, self._prepare, request)
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def put(item: Any) -> None:
            try:
                caller.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed
                pass

        async def pump() -> None:
            try:
                async for output in self._llm.generate(prompt, self._params(request, stream=True), uuid.uuid4().hex,
                                                       lora_request=self._lora(request)):  # fmt: skip
                    for o in output.outputs:
                        put(
                            StreamEvent(
                                o.index, o.text, tuple(o.token_ids), _finish_reason(o.finish_reason), prompt_tokens
                            )
                        )
                put(done)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(exc)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        unfinished = request.sampling.n
        try:
            while unfinished:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason:
                    unfinished -= 1
                yield item
        finally:
            if unfinished:
                future.cancel()  # vLLM's generate() aborts the request when cancelled

    def add_adapter(self, name: str, path: str) -> None:
        """Serve the LoRA adapter in ``path`` to requests naming ``name``."""
        if not self._lora_enabled:
            raise ConfigError("the vllm engine was started without LoRA support",
                              hint="set adapter_path in the config, which starts vLLM with enable_lora")  # fmt: skip
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"{path} is not a peft adapter directory (no adapter_config.json)")
        self._adapters[name] = self._lora_request(name, next(self._adapter_ids), str(path))

    def close(self) -> None:
        """Shut vLLM down (its engine process included) and stop the loop thread."""
        if self._closed:
            return
        self._closed = True

        async def shut_down(llm):
            # Stop reading outputs first, so the engine process exiting is not reported as a failure.
            handler = getattr(llm, "output_handler", None)
            if handler is not None:
                handler.cancel()
            llm.shutdown()

        try:
            asyncio.run_coroutine_threadsafe(shut_down(self._llm), self._loop).result(timeout=120)
        finally:
            # AsyncLLM.__del__ shuts down again: let it run now, not at interpreter exit.
            self._llm = None
            self._stop_loop()
            if self._weights_dir is not None:
                self._weights_dir.cleanup()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()
