"""Decode steps over a :class:`~vistune.inference.slot_cache.SlotBatch`, eager or replayed as CUDA graphs.

A decode step of a 7B model launches about a thousand small kernels; run eagerly from
Python, launching them takes longer than the GPU takes to run them (about 28 ms a token
on an H200, against the ~3 ms it needs to read the weights).  :class:`DecodeRunner`
records each (rows, width, adapter) bucket's step once as a CUDA graph and then replays
it: the inputs are copied into static buffers, the graph runs, and the logits come back
in a static output.  Without CUDA, or where capture fails, the same step runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from vistune.inference.slot_cache import SlotBatch

log = logging.getLogger(__name__)


class DecodeRunner:
    """Runs the decode steps of one engine.

    :param forward: calls the model with the given keyword arguments and returns its output.
    :param pad_id: token fed to the padding rows of a bucket.
    :param use_graphs: capture and replay CUDA graphs (the model must be on a CUDA device).
    """

    def __init__(self, forward: Callable[..., Any], pad_id: int, *, use_graphs: bool):
        self.forward = forward
        self.pad_id = pad_id
        self.use_graphs = use_graphs
        self._graphs: dict[tuple, tuple[Any, Any]] = {}
        self._generation = -1
        self._pool: Any = None
        self._ids: Any = None
        self._columns: Any = None
        self._row_index: Any = None

    def reset(self) -> None:
        """Forget captured graphs (the model's modules or weights were replaced)."""
        self._forget()
        self._generation = -1

    def _forget(self) -> None:
        """Drop the captured graphs and their memory pool.  Once its last graph is gone, PyTorch
        releases a pool, and capturing into its old handle again fails an allocator assertion
        (``use_count > 0``): the next capture takes a new pool."""
        self._graphs.clear()
        self._pool = None

    def step(self, batch: SlotBatch, tokens: Sequence[int], graph_key: Any = None, **extra: Any) -> Any:
        """Feed each row's last token; return the next-token logits ``(rows, vocab)``.

        ``graph_key`` names what else the captured step depends on (the active adapter);
        ``extra`` keyword arguments for the model (a mixed-adapter batch's ``adapter_names``)
        make the step run eagerly.
        """
        import torch

        if batch.generation != self._generation:
            self._forget()
            self._generation = batch.generation
            self._ids = torch.full((batch.slots,), self.pad_id, dtype=torch.long, device=batch.device)
            self._columns = torch.zeros(batch.slots, dtype=torch.long, device=batch.device)
            self._row_index = torch.arange(batch.slots, device=batch.device)
        rows, width = batch.step_shape()
        padding = rows - batch.size
        self._ids[:rows].copy_(torch.tensor(list(tokens) + [self.pad_id] * padding), non_blocking=True)
        self._columns[:rows].copy_(torch.tensor(batch.lengths + [0] * padding), non_blocking=True)
        if extra or not self.use_graphs:
            return self._run(batch, rows, width, extra)[: batch.size]
        key = (rows, width, graph_key)
        if key not in self._graphs:
            captured = self._capture(batch, rows, width)
            if captured is None:
                return self._run(batch, rows, width, extra)[: batch.size]
            self._graphs[key] = captured
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[: batch.size]

    def _run(self, batch: SlotBatch, rows: int, width: int, extra: dict) -> Any:
        """One step on the static inputs: the function a graph records."""
        import torch

        columns = self._columns[:rows]
        batch.cache.begin_step(self._row_index[:rows], columns, width)
        positions = (columns + batch.offsets[:rows]).unsqueeze(1)
        visible = torch.arange(width, device=columns.device).unsqueeze(0) <= columns.unsqueeze(1)
        mask = torch.zeros((rows, 1, 1, width), dtype=batch.dtype, device=columns.device)
        mask.masked_fill_(~visible[:, None, None, :], torch.finfo(batch.dtype).min)
        output = self.forward(input_ids=self._ids[:rows].unsqueeze(1), attention_mask=mask, position_ids=positions,
                              cache=batch.cache, **extra)  # fmt: skip
        return output.logits[:, -1, :]

    def _capture(self, batch: SlotBatch, rows: int, width: int) -> tuple[Any, Any] | None:
        """Record the step of this bucket; ``None`` (and graphs off from then on) if capture fails.

        The warm-up run that capture needs computes this very step, so it writes the same
        keys and values the replay then writes again.
        """
        import torch

        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            # capture_begin/end rather than torch.cuda.graph(), which empties the allocator's
            # cache (and may collect garbage) before every capture: about a second each with
            # a 7B model loaded, paid by the first request of every new bucket.
            with torch.cuda.stream(stream):
                self._run(batch, rows, width, {})
                graph.capture_begin(self._pool, capture_error_mode="thread_local")  # encoding threads run beside it
                try:
                    logits = self._run(batch, rows, width, {})
                finally:
                    graph.capture_end()
            torch.cuda.current_stream().wait_stream(stream)
            return graph, logits
        except Exception as exc:  # noqa: BLE001 - an uncapturable model still decodes, eagerly
            log.warning("decoding without CUDA graphs: capturing a step failed (%s)", exc)
            self.use_graphs = False
            self._forget()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return None
