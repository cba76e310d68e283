"""The ``transformers`` backend: continuous batching over a plain ``transformers`` model.

One scheduler thread owns the model.  Each turn it first prefills the requests that
arrived (all together, left-padded, so a new request's first token does not wait for
the others to finish) and merges them into the running batch, then advances every
running row by one token with the shared KV cache.  Rows leave the batch the moment
they finish.  While rows are running, a turn prefills at most ``prefill_chunk_tokens``
prompt tokens, and a longer prompt is prefilled a chunk per turn
(:mod:`vistune.inference.prefill_chunks`), so running rows never wait long for a token.
Callers never touch the model: they encode their prompt (in a small thread pool, off
the event loop) and receive tokens through a per-request sink, which for
:meth:`TransformersEngine.stream` is an ``asyncio.Queue`` of the caller's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from vistune.errors import VistuneError
from vistune.inference.detokenize import IncrementalText
from vistune.inference.engine import (
    BASE_ADAPTER,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineClosedError,
    GenerationRequest,
    GenerationResult,
    StreamEvent,
    check_adapter,
    check_adapter_dir,
    check_context,
    result_from_events,
)
from vistune.inference.cuda_graphs import DecodeRunner
from vistune.inference.engine_stats import EngineStats
from vistune.inference.kv_batch import RunningBatch, mergeable
from vistune.inference.prefill_chunks import chunk_bounds, media_token_ids
from vistune.inference.prompts import encode_prompt, template_encoder, tokenizer_of
from vistune.inference.sampling import RowSampler, sample_next
from vistune.inference.slot_cache import SlotBatch
from vistune.models import text_config as text_config_of

#: Token budget of one prefill when no rows are decoding: more waiting prompts are prefilled on the next turn.
MAX_PREFILL_TOKENS = 16384
#: Prompt tokens of one prefill call while rows are decoding (``prefill_chunk_tokens``'s default).  Smaller
#: chunks favour the time to first token, larger ones throughput: serving 586-token image prompts to 32
#: clients on one H200 (Llava-1.5-7B), 2048 gave 13.5 req/s with TTFT p50 0.22 s, 8192 15.8 req/s with
#: 0.53 s and fewer long stalls (inter-token p95 27 ms against 120 ms; bench/results/serve_h200.json).
PREFILL_CHUNK_TOKENS = 8192
#: When the model is idle, the longest the first arrival waits for prompts being encoded at that moment,
#: to prefill them together (encoding a prompt with a 640x480 image took 13-22 ms on the H200's host).
BATCH_WAIT_S = 0.03
#: Most threads encoding prompts (chat template, image preprocessing, tokenizing) beside the model.
MAX_ENCODE_THREADS = 8


def attention_kernels(device_type: str) -> Any:
    """A context in which SDPA picks any kernel but cuDNN's, on a GPU (elsewhere: no change).

    PyTorch prefers cuDNN's attention on H100/H200, and cuDNN builds an execution graph for
    every new shape it sees: a few hundred milliseconds each (SGLang and FlashInfer report
    260-400 ms).  A server's prefills come in ever new shapes (how many prompts, how long),
    so every such step would pay it; the flash and memory-efficient kernels need no build.
    Even with its graph built, a cuDNN attention call took 0.58 ms of host time for 25 us of
    GPU time in the H200 training profile bench/results/profile_sft_D_before_h200.txt.
    The switch is process-wide while it lasts, so it wraps model calls only.
    """
    import contextlib

    if device_type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def encode_threads() -> int:
    """Threads that encode prompts: the CPUs left after the model's and the server's threads, 2 to
    :data:`MAX_ENCODE_THREADS`.  Encoding a prompt with a 640x480 image takes 10-20 ms of CPU; with
    two threads, eight requests arriving together waited about as long for a thread as they took
    to encode (tiny Llava at 336 px on two CPUs)."""
    from vistune.hardware import usable_cpus

    return max(2, min(MAX_ENCODE_THREADS, usable_cpus() - 2))


class _Job:
    """A submitted request: its encoded prompt, its rows' progress and where events go."""

    def __init__(self, request: GenerationRequest, inputs: dict[str, Any], sink: Callable[[Any], None]):
        self.request = request
        self.inputs = inputs
        self.prompt_tokens = len(inputs["input_ids"])
        self.sink = sink
        self.cancelled = False
        self.submitted_at = 0.0  # time.perf_counter() when it was queued

    @property
    def n(self) -> int:
        return self.request.sampling.n


class _Row:
    """One completion being generated."""

    def __init__(self, job: _Job, index: int, text: IncrementalText, sampler: RowSampler):
        self.job = job
        self.index = index
        self.text = text
        self.sampler = sampler
        self.token_ids: list[int] = []


class _Prefill:
    """Prompts being prefilled: one model call for a batch of prompts, or, for one long prompt,
    one chunk per scheduler turn until ``bounds`` (the chunks' ends) are all done."""

    def __init__(self, jobs: list[_Job], rows: list[_Row], inputs: dict[str, Any], cache: Any, bounds: list[int],
                 started: float):  # fmt: skip
        self.jobs, self.rows, self.inputs, self.cache, self.bounds = jobs, rows, inputs, cache, bounds
        self.done = 0  # prompt columns in the cache
        self.started = started  # when its jobs left the queue
        self.seconds = 0.0  # spent collating and in its model calls
        self.ended = started  # when its last call so far returned

    @property
    def cancelled(self) -> bool:
        return all(job.cancelled for job in self.jobs)

    def next_call(self) -> dict[str, Any]:
        """The model inputs of the next chunk (the whole prompt for an unchunked prefill)."""
        end = self.bounds[0]
        if self.done == 0 and len(self.bounds) == 1:
            return self.inputs
        call = {"attention_mask": self.inputs["attention_mask"][:, :end]}
        for key, value in self.inputs.items():
            if key in ("input_ids", "position_ids"):
                call[key] = value[:, self.done : end]
            elif key != "attention_mask" and self.done == 0:
                call[key] = value  # media go with the first chunk (see prefill_chunks)
        return call


class _Collector:
    """Sink of a blocking :meth:`TransformersEngine.generate` call: keeps a request's events
    and calls ``done`` once all its completions have finished (or it failed)."""

    def __init__(self, request: GenerationRequest, done: Callable[[], None]):
        self.request = request
        self.events: list[StreamEvent] = []
        self.error: BaseException | None = None
        self._unfinished = request.sampling.n
        self._done = done

    def __call__(self, event: Any) -> None:
        if self._unfinished == 0:
            return
        if isinstance(event, BaseException):
            self.error = event
            self._unfinished = 0
        else:
            self.events.append(event)
            if event.finish_reason:
                self._unfinished -= 1
        if self._unfinished == 0:
            self._done()

    def result(self) -> GenerationResult:
        return result_from_events(self.events, self.request.request_id)


def _max_model_len(model: Any) -> int:
    config = model.config
    text_config = text_config_of(config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None) or getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class TransformersEngine:
    """:class:`vistune.inference.Engine` over a ``transformers`` model with continuous batching.

    :param model_path: local checkpoint directory.
    :param model_type: the :class:`vistune.specs.ModelType` whose loader loads it.
    :param config: the run's :class:`vistune.config.RunConfig` (device, dtype, quantization,
        template, ``adapter_path``, ``max_batch_size``: ``auto`` is resolved once the model is
        loaded, see :mod:`vistune.inference.batch_size`).
    """

    def __init__(self, model_path: str, model_type: Any, config: Any):
        from vistune.inference import batch_size
        from vistune.models import LoadOptions
        from vistune.plugins import get_plugin_manager
        from vistune.options import spec_option_values
        from vistune.quantization import get_scheme
        from vistune.specs import load_ref

        scheme = get_scheme(config.quantization)
        options = LoadOptions(dtype=config.dtype, device=config.device, attn_implementation=config.attn_implementation,
                              quantization=scheme, trust_remote_code=config.trust_remote_code,
                              quantization_options=spec_option_values(config, scheme) if scheme else {})  # fmt: skip
        model, processor = load_ref(model_type.loader)(str(model_path), options)
        pm = get_plugin_manager()
        pm.hook.vistune_model_loaded(model=model, processor=processor, model_type=model_type, config=config)
        encoder = template_encoder(processor, config.template or model_type.default_template, _max_model_len(model),
                                   config)  # fmt: skip
        self._setup(model, processor, encoder, max_batch_size=batch_size.resolve(
            config.max_batch_size, model, max_model_len=_max_model_len(model),
            utilization=config.gpu_memory_utilization, prefill_tokens=MAX_PREFILL_TOKENS), cuda_graphs=config.cuda_graphs,
            prefill_chunk_tokens=config.prefill_chunk_tokens)  # fmt: skip
        if config.adapter_path:
            self.add_adapter("default", config.adapter_path)
            self._default_adapter = "default"

    @classmethod
    def from_model(
        cls, model: Any, processor: Any, encoder: Any, *, max_batch_size: int = 8, config: Any = None
    ) -> TransformersEngine:
        """An engine over an already loaded model (an RL policy, a test model).

        The engine runs the model as it is: put it in eval mode first (dropout, and
        gradient checkpointing in training mode, which turns the KV cache off), and do not
        change its weights while a :meth:`generate` call is running.  Closing the engine
        leaves the model alone.

        :param encoder: the template's :class:`vistune.templates.Encoder` for ``processor``.
        :param config: the run's config, which every backend's ``from_model`` is given; this
            engine runs the policy as it is and needs nothing from it.
        """
        engine = cls.__new__(cls)
        engine._setup(model, processor, encoder, max_batch_size=max_batch_size, cuda_graphs=False, keep_cache=False,
                      prefill_chunk_tokens=getattr(config, "prefill_chunk_tokens", PREFILL_CHUNK_TOKENS))  # fmt: skip
        return engine

    def _setup(self, model: Any, processor: Any, encoder: Any, *, max_batch_size: int, cuda_graphs: bool = True,
               keep_cache: bool = True, prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> None:  # fmt: skip
        """``cuda_graphs``: replay decode steps as CUDA graphs where the model allows it;
        ``keep_cache``: keep the KV slots allocated while idle (a server), or free them (RL rollouts
        between training steps); ``prefill_chunk_tokens``: see the module docstring."""
        import torch

        self.model = model
        self.processor = processor
        self.encoder = encoder
        self.tokenizer = tokenizer_of(processor)
        self.max_batch_size = max_batch_size
        self.max_model_len = _max_model_len(model)
        self.eos_ids = _eos_ids(model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self.device = next(model.parameters()).device
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self._default_adapter: str | None = None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self._rope_owner = next(
            (m for m in base.modules() if hasattr(m, "rope_deltas") and hasattr(m, "get_rope_index")), None
        )
        self.prefill_chunk_tokens = prefill_chunk_tokens
        #: Placeholder ids of the model's media, which chunk_bounds keeps in a prompt's first chunk.
        self._media_tokens = media_token_ids(getattr(base, "config", None))
        self._lock = threading.Condition()
        self._model_lock = threading.Lock()
        self._waiting: deque[_Job] = deque()
        self._rows: list[_Row] = []
        self._encoding = 0  # streamed prompts being encoded, which an idle scheduler waits a moment for
        self._batch: RunningBatch | SlotBatch | None = None
        self._prefilling: _Prefill | None = None
        self._keep_cache = keep_cache
        text_config = text_config_of(getattr(base, "config", None))
        #: Slots need an attention kernel that takes a 4D mask, and full attention in every layer.
        self._slots_allowed = getattr(text_config, "_attn_implementation", "sdpa") in ("sdpa", "eager", None)
        quantized = bool(getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None))
        self._decoder = DecodeRunner(self._slot_forward, self.pad_id,
                                     use_graphs=cuda_graphs and self.device.type == "cuda" and not quantized)  # fmt: skip
        self._closed = False
        self._stats = EngineStats()
        self._encode_pool = concurrent.futures.ThreadPoolExecutor(max_workers=encode_threads(), thread_name_prefix="vistune-encode")
        self._thread = threading.Thread(target=self._loop, name="vistune-engine", daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Complete ``requests`` together; blocks until all are done (see :class:`Engine`)."""
        prepared = [self._prepare(request) for request in requests]  # refuse before anything runs
        remaining = threading.Semaphore(0)
        collectors = [_Collector(request, remaining.release) for request in requests]
        jobs = [_Job(request, inputs, collector) for request, inputs, collector in zip(requests, prepared, collectors)]
        self._submit(jobs)
        for _ in jobs:
            remaining.acquire()
        for collector in collectors:
            if collector.error is not None:
                raise collector.error
        return [collector.result() for collector in collectors]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Yield text as it is generated (see :class:`Engine`)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._encoding += 1
        try:
            inputs = await loop.run_in_executor(self._encode_pool, self._prepare_queued, request, time.perf_counter())
        except BaseException as exc:
            self._encoded()
            if isinstance(exc, RuntimeError) and self._closed:  # the encoding pool was shut down by close()
                raise EngineClosedError("the engine is closed") from exc
            raise
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the caller's loop is gone: nobody is listening
                job.cancelled = True

        job = _Job(request, inputs, sink)
        self._submit([job], encoded=True)
        unfinished = request.sampling.n
        try:
            while unfinished:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                if event.finish_reason:
                    unfinished -= 1
                yield event
        finally:
            if unfinished:
                job.cancelled = True

    def stats(self) -> dict[str, float]:
        """Cumulative counters of where time went since the engine started (see
        :mod:`vistune.inference.engine_stats`); a copy, safe to read from any thread.  It waits
        for a model step in progress (milliseconds; a prefill can take longer): call it off an event loop."""
        return self._stats.snapshot()

    def add_adapter(self, name: str, path: str) -> None:
        """Load the LoRA adapter in ``path`` (peft format) as ``name``; rows pick it per request."""
        check_adapter_dir(path)
        with self._model_lock:
            if hasattr(self.model, "load_adapter") and hasattr(self.model, "peft_config"):
                self.model.load_adapter(path, adapter_name=name)
            else:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.eval()
            self._decoder.reset()  # captured steps ran the model without this adapter's layers

    def close(self) -> None:
        """Stop the scheduler; waiting and running requests fail with :class:`EngineClosedError`."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        self._encode_pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> TransformersEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------

    def _prepare_queued(self, request: GenerationRequest, queued_at: float) -> dict[str, Any]:
        """:meth:`_prepare` in an encode thread, counting how long the request waited for the thread."""
        self._stats.add(encode_wait_seconds=time.perf_counter() - queued_at)
        return self._prepare(request)

    def _prepare(self, request: GenerationRequest) -> dict[str, Any]:
        """Encode the prompt and check it fits; raises before the request is queued."""
        if self._closed:
            raise EngineClosedError("the engine is closed")
        started = time.perf_counter()
        inputs = encode_prompt(request.prompt, self.encoder, self.tokenizer)
        check_adapter(request.adapter, getattr(self.model, "peft_config", None) or {})
        check_context(len(inputs["input_ids"]), request.sampling, self.max_model_len)
        self._stats.add(encode_seconds=time.perf_counter() - started)
        return inputs

    def _encoded(self) -> None:
        with self._lock:
            self._encoding -= 1
            self._lock.notify_all()

    def _submit(self, jobs: Sequence[_Job], *, encoded: bool = False) -> None:
        """Queue ``jobs``; ``encoded``: they are the streamed prompts whose encoding just ended."""
        with self._lock:
            if encoded:  # in the same locked step as queueing: the scheduler never sees the job in neither
                self._encoding -= len(jobs)
            if self._closed:
                raise EngineClosedError("the engine is closed")
            now = time.perf_counter()
            for job in jobs:
                job.submitted_at = now
            self._stats.add(requests=len(jobs))
            self._waiting.extend(jobs)
            self._lock.notify_all()

    # -- the scheduler thread ------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                admitted = self._next_admissions()
                if admitted is None:
                    break
                self._drop_cancelled()
                if admitted:
                    self._run_guarded(admitted, functools.partial(self._start_prefill, admitted))
                if self._prefilling is not None:
                    with self._stats.step():  # stats() waits for the step's counters
                        self._prefill_step()
                if self._rows:
                    with self._stats.step():
                        rows, started = len(self._rows), time.perf_counter()
                        self._run_guarded([row.job for row in self._rows], self._decode_step)
                        self._stats.add(decode_steps=1, decode_rows=rows, decode_seconds=time.perf_counter() - started)
        self._fail_all(EngineClosedError("the engine was closed before the request finished"))

    def _next_admissions(self) -> list[_Job] | None:
        """Jobs to prefill this turn (possibly none); ``None`` when the engine is closed."""
        with self._lock:
            while not self._closed and not self._waiting and not self._rows and self._prefilling is None:
                self._lock.wait()
            if self._closed:
                return None
            if self._prefilling is not None:
                return []  # a long prompt's chunks come first
            if self._waiting and not self._rows:
                # Idle model: prompts being encoded now (sent at about the same moment) share the prefill.
                deadline = time.monotonic() + BATCH_WAIT_S
                while (self._encoding and len(self._waiting) < self.max_batch_size
                       and (left := deadline - time.monotonic()) > 0):  # fmt: skip
                    self._lock.wait(left)
            can_merge = self._batch is None or self._batch.mergeable
            budget = self.prefill_chunk_tokens if self._rows else MAX_PREFILL_TOKENS
            admitted: list[_Job] = []
            rows, tokens = len(self._rows), 0
            while self._waiting and can_merge:
                job = self._waiting[0]
                if job.cancelled:
                    self._waiting.popleft()
                    continue
                long = job.prompt_tokens > self.prefill_chunk_tokens  # prefilled alone, in chunks
                if rows + job.n > self.max_batch_size and (admitted or self._rows):
                    break
                if admitted and (long or tokens + job.prompt_tokens > budget):
                    break
                admitted.append(self._waiting.popleft())
                rows, tokens = rows + job.n, tokens + job.prompt_tokens
                if long:
                    break
            return admitted

    def _count_prefill(self, prefill: _Prefill) -> None:
        """Add a finished (or abandoned) prefill to the stats: its jobs' wait in the queue, the time
        of its model calls, and the time to first token of those it gave one (not failed or cancelled)."""
        ended, jobs = prefill.ended, prefill.jobs
        served = [job for job in jobs if not job.cancelled]
        self._stats.add(admissions=len(jobs), queue_wait_seconds=sum(prefill.started - job.submitted_at for job in jobs),
                        prefills=1, prefill_rows=len(jobs), prefill_tokens=sum(job.prompt_tokens for job in jobs),
                        prefill_seconds=prefill.seconds, first_tokens=len(served),
                        first_token_seconds=sum(ended - job.submitted_at for job in served))  # fmt: skip

    def _run_guarded(self, jobs: Sequence[_Job], step: Callable[[], None]) -> None:
        """Run a model step; if it raises, fail the jobs it concerned and keep serving.

        A failed prefill concerns only the jobs being admitted (they join the running
        batch at its very end); a failed decode step concerns every running row.
        """
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - reported to every request involved
            error = exc if isinstance(exc, VistuneError) else RuntimeError(f"generation failed: {exc!r}")
            failed = {id(job): job for job in jobs}
            for job in failed.values():
                job.cancelled = True
                job.sink(error)
            self._rows = [row for row in self._rows if id(row.job) not in failed]
            if not self._rows:
                self._release_batch()

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            jobs = list(self._waiting) + [row.job for row in self._rows]
            self._waiting.clear()
        if self._prefilling is not None:
            jobs += self._prefilling.jobs
            self._prefilling = None
        self._rows = []
        self._release_batch()
        for job in {id(j): j for j in jobs}.values():
            job.sink(error)

    def _drop_cancelled(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.job.cancelled]
        if len(keep) != len(self._rows):
            self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._release_batch()
        else:
            self._batch.select(keep)

    def _release_batch(self) -> None:
        """No rows run: keep the empty KV slots for the next requests, or free them."""
        if isinstance(self._batch, SlotBatch) and self._keep_cache:
            self._batch.select([])
        else:
            self._batch = None

    # -- model steps -----------------------------------------------------------------------

    def _forward(self, rows: Sequence[Any], **kwargs: Any) -> Any:
        """One model call; ``rows`` give each batch row's adapter (peft mixed-adapter batches)."""
        with self._model_lock, attention_kernels(self.device.type):
            return self._call_model(**kwargs, **self._adapter_names(rows))

    def _adapter_names(self, rows: Sequence[Any], padding: int = 0) -> dict[str, Any]:
        """``{"adapter_names": [...]}`` when the rows do not all use the active adapter, else ``{}``."""
        if not hasattr(self.model, "peft_config"):
            return {}
        # peft names the base model BASE_ADAPTER in a mixed-adapter batch
        names = [row.job.request.adapter or self._default_adapter or BASE_ADAPTER for row in rows]
        active = getattr(self.model, "active_adapter", None)
        if all(name == active for name in names):
            return {}
        return {"adapter_names": names + names[:1] * padding}

    def _slot_forward(self, *, cache: Any, **kwargs: Any) -> Any:
        """A decode step's model call (the :class:`DecodeRunner` holds the inputs and the locks are held)."""
        return self._call_model(**kwargs, **{self._cache_kwarg: cache}, use_cache=True)

    def _call_model(self, **kwargs: Any) -> Any:
        """The model on ``kwargs``, computing logits for the last position only where it can."""
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:
            return DynamicCache()

    def _collate(self, jobs: Sequence[_Job]) -> dict[str, Any]:
        """Left-pad the prompts into one batch; image tensors are concatenated in job order."""
        import torch

        from vistune.data.collate import pad_tensors

        length = max(job.prompt_tokens for job in jobs)
        batch: dict[str, Any] = {}
        keys = list(dict.fromkeys(k for job in jobs for k in job.inputs))
        for key in keys:
            if key in ("labels", "attention_mask", "token_type_ids"):
                continue
            values = [job.inputs.get(key) for job in jobs]
            if all(isinstance(v, list) and len(v) == job.prompt_tokens for v, job in zip(values, jobs)):
                pad = self.pad_id if key == "input_ids" else 0
                batch[key] = torch.tensor([[pad] * (length - len(v)) + v for v in values], dtype=torch.long)
            else:
                present = [torch.as_tensor(v) for v in values if v is not None]
                if present:
                    batch[key] = pad_tensors(present)
        lengths = torch.tensor([job.prompt_tokens for job in jobs])
        batch["attention_mask"] = (torch.arange(length).unsqueeze(0) >= (length - lengths).unsqueeze(1)).long()
        for key, value in batch.items():
            value = value.to(self.device)
            if value.is_floating_point():
                value = value.to(self.dtype)
            batch[key] = value
        return batch

    def _start_prefill(self, jobs: list[_Job]) -> None:
        """Collate ``jobs`` into the prefill the next turns run (see :class:`_Prefill`)."""
        started = time.perf_counter()
        rows: list[_Row] = []
        for job in jobs:
            sampling = job.request.sampling
            for i in range(job.n):
                seed = None if sampling.seed is None else sampling.seed + i
                text = IncrementalText(self.encoder.decode, sampling.stop)
                rows.append(_Row(job, i, text, RowSampler.make(sampling.temperature, sampling.top_p, seed)))
        inputs = self._collate(jobs)
        mask = inputs["attention_mask"]
        multimodal_positions = self._rope_owner is not None and any(
            key in inputs for key in ("image_grid_thw", "video_grid_thw")
        )
        if multimodal_positions:
            self._rope_owner.rope_deltas = None  # the model computes 3D positions and stores the deltas
        else:
            inputs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
        bounds = None
        if len(jobs) == 1 and self._rope_owner is None:  # 3D positions are computed over the whole prompt
            bounds = chunk_bounds(jobs[0].inputs, self.prefill_chunk_tokens, self._media_tokens)
        self._prefilling = _Prefill(jobs, rows, inputs, self._new_cache(), bounds or [mask.shape[1]], started)

    def _prefill_step(self) -> None:
        """Run the next call of the prefill in progress; after its last, the rows join the batch."""
        prefill = self._prefilling
        if prefill.cancelled:
            self._prefilling = None
            self._count_prefill(prefill)
            return
        started = prefill.started if prefill.done == 0 else time.perf_counter()
        try:
            self._run_guarded(prefill.jobs, functools.partial(self._prefill_call, prefill))
        finally:
            prefill.ended = time.perf_counter()
            prefill.seconds += prefill.ended - started
        if prefill.cancelled or not prefill.bounds:
            self._prefilling = None
            self._count_prefill(prefill)

    def _prefill_call(self, prefill: _Prefill) -> None:
        per_job_rows = [row for row in prefill.rows if row.index == 0]
        call = prefill.next_call()
        output = self._forward(per_job_rows, **call, **{self._cache_kwarg: prefill.cache}, use_cache=True)
        prefill.done = prefill.bounds.pop(0)
        if not prefill.bounds:
            self._join(prefill, output.logits[:, -1, :])

    def _join(self, prefill: _Prefill, logits: Any) -> None:
        """Sample the prefilled rows' first tokens and add those still going to the running batch."""
        import torch

        jobs, rows, mask = prefill.jobs, prefill.rows, prefill.inputs["attention_mask"]
        padding = mask.shape[1] - mask.sum(dim=1)
        offsets = -padding
        if "position_ids" not in prefill.inputs:  # the model computed 3D positions and stored their deltas
            offsets = offsets + self._rope_owner.rope_deltas.reshape(-1).to(offsets.device)
        batch = RunningBatch(prefill.cache, mask, offsets)
        expand = [j for j, job in enumerate(jobs) for _ in range(job.n)]
        if len(expand) != len(jobs):
            batch.cache.batch_select_indices(torch.tensor(expand, device=mask.device))
            batch.attention_mask = batch.attention_mask[expand]
            batch.offsets = batch.offsets[expand]
            logits = logits[expand]
        tokens = sample_next(logits, [row.sampler for row in rows])
        keep = self._advance(rows, tokens)
        if not keep:
            return
        if len(keep) != len(rows):
            batch.select(keep)
            rows = [rows[i] for i in keep]
        if self._batch is None and self._slots_allowed and mergeable(batch.cache):
            self._batch = SlotBatch(batch.cache, self.max_batch_size)
        if isinstance(self._batch, SlotBatch):
            needed = max(row.job.prompt_tokens + row.job.request.sampling.max_tokens for row in rows)
            self._batch.absorb(batch.cache, batch.attention_mask, batch.offsets, needed=min(needed, self.max_model_len))
            self._rows = self._rows + rows
        elif self._batch is None:
            self._batch, self._rows = batch, rows
        else:
            self._batch.merge(batch)
            self._rows = self._rows + rows

    def _decode_step(self) -> None:
        batch = self._batch
        if isinstance(batch, SlotBatch):
            padding = batch.step_shape()[0] - batch.size
            with self._model_lock, attention_kernels(self.device.type):
                logits = self._decoder.step(batch, [row.token_ids[-1] for row in self._rows],
                                            getattr(self.model, "active_adapter", None),
                                            **self._adapter_names(self._rows, padding))  # fmt: skip
            batch.advance()
        else:
            logits = self._dynamic_decode(batch)
        tokens = sample_next(logits, [row.sampler for row in self._rows])
        keep = self._advance(self._rows, tokens)
        if len(keep) != len(self._rows):
            self._keep_rows(keep)

    def _dynamic_decode(self, batch: RunningBatch) -> Any:
        """A decode step over a ``DynamicCache`` (models whose layers cannot use slots)."""
        import torch

        last = torch.tensor([[row.token_ids[-1]] for row in self._rows], device=batch.attention_mask.device)
        positions = batch.next_positions()
        batch.grow()
        output = self._forward(self._rows, input_ids=last, attention_mask=batch.attention_mask, position_ids=positions,
                               use_cache=True, **{self._cache_kwarg: batch.cache})  # fmt: skip
        return output.logits[:, -1, :]

    def _advance(self, rows: Sequence[_Row], tokens: Sequence[int]) -> list[int]:
        """Append each row's new token, send its text; return the indices of rows still going."""
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if row.job.cancelled:
                continue
            row.token_ids.append(token)
            sampling = row.job.request.sampling
            finish = None
            if token in self.eos_ids and not sampling.ignore_eos:
                finish = FINISH_STOP
                delta = row.text.update(row.token_ids[:-1], final=True)
            else:
                at_limit = (
                    len(row.token_ids) >= sampling.max_tokens
                    or row.job.prompt_tokens + len(row.token_ids) >= self.max_model_len
                )
                delta = row.text.update(row.token_ids, final=at_limit)
                if row.text.stopped:
                    finish = FINISH_STOP
                elif at_limit:
                    finish = FINISH_LENGTH
            row.job.sink(StreamEvent(row.index, delta, (token,), finish, row.job.prompt_tokens))
            if finish is None:
                keep.append(i)
        return keep
