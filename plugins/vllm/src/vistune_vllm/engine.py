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
import contextlib
import importlib.util
import itertools
import json
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from vistune.errors import ConfigError
from vistune.inference.background_loop import BackgroundLoop, Emit
from vistune.inference.batch_size import AUTO, ENGINE_CHOSEN
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

from vistune_vllm.translate import engine_kwargs, sampling_kwargs

#: LoRA ranks vLLM kernels are built for; the engine's maximum is rounded up to one of them.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _adapter_rank(path: str) -> int:
    """The rank ``r`` of the peft adapter in ``path`` (peft's default 8 where it cannot be read)."""
    try:
        return int(json.loads((Path(path) / "adapter_config.json").read_text()).get("r", 8))
    except (OSError, ValueError):
        return 8


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


def _max_num_seqs(llm: Any) -> int:
    """The most sequences vLLM's scheduler runs together, as vLLM resolved it (:data:`ENGINE_CHOSEN` if it hides it)."""
    scheduler = getattr(getattr(llm, "vllm_config", None), "scheduler_config", None)
    return int(getattr(scheduler, "max_num_seqs", None) or ENGINE_CHOSEN)


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
        ``max_model_len``, capped by the model's), ``max_batch_size`` (``max_num_seqs``;
        ``auto`` leaves vLLM's own), ``adapter_path`` (served as the default LoRA adapter).
    """

    def __init__(
        self, model_path: str, model_type: Any, config: Any, *, encoder: Any = None, lora_rank: int | None = None
    ):
        import vllm
        from vllm.lora.request import LoRARequest

        self._vllm = vllm
        self._lora_request = LoRARequest
        model_path = str(model_path)
        self._prompts = CheckpointPrompts(model_path, model_type, config, encoder)
        max_model_len = self._prompts.max_model_len
        self.tokenizer, self.encoder = self._prompts.tokenizer, self._prompts.encoder
        if lora_rank is None and config.adapter_path:
            lora_rank = _adapter_rank(config.adapter_path)
        max_lora_rank = _kernel_rank(lora_rank) if lora_rank else None
        kwargs = engine_kwargs(model_path, config, max_model_len=max_model_len, max_lora_rank=max_lora_rank)
        if not _cuda_available():
            kwargs["enforce_eager"] = True  # no CUDA graphs to capture; starts faster
        self._loop = BackgroundLoop("vistune-vllm").start()
        self._closed = False
        self._weights_dir: tempfile.TemporaryDirectory | None = None
        self._weight_version = 0
        self._adapters: dict[str, Any] = {}
        self._adapter_ids = itertools.count(1)
        self._default_adapter: str | None = None
        self._lora_enabled = max_lora_rank is not None
        args = vllm.AsyncEngineArgs(**kwargs)

        async def create():
            return vllm.AsyncLLMEngine.from_engine_args(args)

        try:
            self._llm = self._loop.run(create())
        except BaseException:
            self._loop.stop()
            raise
        self.max_model_len = int(self._llm.model_config.max_model_len)
        #: Requests are queued beyond this; RL raises it to a rollout's size (informational for vLLM).
        #: ``max_batch_size: auto`` is vLLM's own ``max_num_seqs``.
        auto = config.max_batch_size == AUTO
        self.max_batch_size = _max_num_seqs(self._llm) if auto else max(config.max_batch_size, 1)
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
        # the rollout's size, which the trainer gives, or a configured number above it
        rows = max_batch_size if config.max_batch_size == AUTO else max(config.max_batch_size, max_batch_size)
        config = attrs.evolve(config, adapter_path=None, max_batch_size=rows)
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
                self._loop.run(self._llm.remove_lora(old.lora_int_id))
        else:
            from safetensors.torch import save_file

            path.mkdir(parents=True)
            save_file(_merged_state_dict(model), str(path / "model.safetensors"))
            if hasattr(model, "peft_config"):
                self._adapters[model.active_adapter] = None  # the merged policy is vLLM's base model now

            async def reload():
                await self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
                await self._llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

            self._loop.run(reload())
        shutil.rmtree(previous, ignore_errors=True)

    # -- requests ------------------------------------------------------------------------

    def _prepare(self, request: GenerationRequest) -> tuple[dict[str, Any], int]:
        """vLLM's prompt (token ids, images) and its length in tokens as the model sees it."""
        if self._closed:
            raise EngineClosedError("the engine is closed")
        ids, images, prompt_tokens = self._prompts.encode(request, self._adapters, self.max_model_len)
        engine_prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if images:
            engine_prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        return engine_prompt, prompt_tokens

    def _params(self, request: GenerationRequest, *, stream: bool) -> Any:
        from vllm.sampling_params import RequestOutputKind

        kwargs = sampling_kwargs(request.sampling, stream=stream)
        kwargs["output_kind"] = getattr(RequestOutputKind, kwargs["output_kind"])
        return self._vllm.SamplingParams(**kwargs)

    def _lora(self, request: GenerationRequest) -> Any:
        name = adapter_to_use(request, self._default_adapter)
        return None if name is None else self._adapters[name]

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

        return self._loop.run(run_all())

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Yield text as vLLM generates it; closing the iterator aborts the request in vLLM."""
        prompt, prompt_tokens = await asyncio.get_running_loop().run_in_executor(None, self._prepare, request)

        async def produce(emit: Emit) -> None:  # cancelling it aborts the request in vLLM
            async for output in self._llm.generate(prompt, self._params(request, stream=True), uuid.uuid4().hex,
                                                   lora_request=self._lora(request)):  # fmt: skip
                for o in output.outputs:
                    reason = _finish_reason(o.finish_reason)
                    emit(StreamEvent(o.index, o.text, tuple(o.token_ids), reason, prompt_tokens))

        async with contextlib.aclosing(self._loop.relay([produce], request.sampling.n)) as events:
            async for event in events:
                yield event

    def add_adapter(self, name: str, path: str) -> None:
        """Serve the LoRA adapter in ``path`` to requests naming ``name``."""
        if not self._lora_enabled:
            raise ConfigError("the vllm engine was started without LoRA support",
                              hint="set adapter_path in the config, which starts vLLM with enable_lora")  # fmt: skip
        check_adapter_dir(path)
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
            self._loop.run(shut_down(self._llm), timeout=120)
        finally:
            # AsyncLLM.__del__ shuts down again: let it run now, not at interpreter exit.
            self._llm = None
            self._loop.stop()
            if self._weights_dir is not None:
                self._weights_dir.cleanup()


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()
