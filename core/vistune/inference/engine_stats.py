"""Cumulative counters of where an engine's time goes, from a request's arrival to its last token.

A request's time to first token, seen from inside the engine, is: waiting for an encode
thread, encoding its prompt, waiting in the queue until the scheduler admits it to a
prefill, then the prefill itself (whose last step samples the first token).  The
counters below add those phases up over every request since the engine started, so
that a reader takes two snapshots and divides the differences (seconds per request,
seconds per prefill, rows per decode step).  They only grow; ``vistune serve`` exposes
them at ``/metrics`` (see :mod:`vistune.serving.prometheus`).

Times are wall-clock seconds from :func:`time.perf_counter`.  A GPU step's time ends
with the host sync of its sampling, so it is the step's real duration, not its launch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import attrs


def _counter(help: str, default: Any = 0) -> Any:
    return attrs.field(default=default, metadata={"help": help})


@attrs.define
class EngineStats:
    """Counters of one engine, safe to update from several threads (:meth:`add` takes a lock).

    The scheduler runs each model step and adds its counters inside :meth:`step`, and
    :meth:`snapshot` waits for a step in progress: a request whose last token was sent
    during a step is never read without that step's counters.
    """

    requests: int = _counter("requests submitted to the scheduler (prompts encoded and queued)")
    encode_wait_seconds: float = _counter(
        "seconds prompts waited for a free encode thread before their encoding started (streamed requests)", 0.0
    )
    encode_seconds: float = _counter(
        "seconds spent encoding prompts: chat template, image processing and tokenizing, in the encode threads", 0.0
    )
    admissions: int = _counter("requests admitted to a prefill")
    queue_wait_seconds: float = _counter(
        "seconds requests waited between being submitted and being admitted to a prefill (sum over requests)", 0.0
    )
    prefills: int = _counter("prefill calls (one batched forward pass over the prompts admitted together)")
    prefill_rows: int = _counter("prompts prefilled (rows of the prefill forward passes)")
    prefill_tokens: int = _counter("prompt tokens prefilled")
    prefill_seconds: float = _counter("seconds spent in prefill calls, sampling of the first tokens included", 0.0)
    decode_steps: int = _counter("decode steps (one token for every running row)")
    decode_rows: int = _counter("rows advanced by decode steps (the sum of the steps' batch sizes)")
    decode_seconds: float = _counter("seconds spent in decode steps, sampling included", 0.0)
    first_tokens: int = _counter("requests that received their first token")
    first_token_seconds: float = _counter(
        "seconds from a request's submission to its first token (sum over the requests counted in first_tokens)", 0.0
    )
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False, eq=False)
    _step: threading.RLock = attrs.field(factory=threading.RLock, init=False, repr=False, eq=False)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Hold while running one model step and adding its counters (the scheduler thread)."""
        with self._step:
            yield

    def add(self, **amounts: float) -> None:
        """Add ``amounts`` to the counters of those names (a ``KeyError`` names an unknown one)."""
        with self._lock:
            for name, amount in amounts.items():
                if name not in _NAMES:
                    raise KeyError(f"EngineStats has no counter {name!r}")
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, float]:
        """A plain ``{counter: value}`` copy, consistent across counters; waits for a step in progress."""
        with self._step, self._lock:
            return {name: getattr(self, name) for name in _NAMES}


#: Counter names, in the order a reader meets the phases.
_NAMES = tuple(field.name for field in attrs.fields(EngineStats) if "help" in field.metadata)
#: What each counter means, by name (the help text of its exported metric).
DESCRIPTIONS: dict[str, str] = {
    field.name: field.metadata["help"] for field in attrs.fields(EngineStats) if "help" in field.metadata
}
