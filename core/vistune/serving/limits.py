"""Admission control: a bounded number of requests in flight, and draining on shutdown.

The engine batches up to ``max_batch_size`` rows and keeps the rest waiting.  The
server lets at most ``max_batch_size + max_queue`` requests in at once; the next one
is answered 429 at once instead of waiting without bound.  While the server shuts
down, new requests get 503 and the ones in flight are finished.
"""

from __future__ import annotations

import asyncio

from vistune.serving.errors import APIError


class Admission:
    """Counts requests in flight (single event loop; no lock needed)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.in_flight = 0
        #: Requests let in, and requests answered 429 because the server was full, since it started.
        self.admitted = 0
        self.refused = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        """Admit one request, or raise 429 (full) / 503 (shutting down)."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable", code="shutting_down")
        if self.in_flight >= self.capacity:
            self.refused += 1
            raise APIError(429, f"the server is at capacity ({self.capacity} requests in flight); retry later",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})  # fmt: skip
        self.in_flight += 1
        self.admitted += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight; ``False`` if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
