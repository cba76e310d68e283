"""An event loop of its own, in a daemon thread, for engines bound to one asyncio loop.

vLLM's ``AsyncLLM`` and SGLang's ``Engine`` run on the loop they were built on.  Kept on
a loop in a background thread, one such engine serves callers on any thread (the
blocking :meth:`~vistune.inference.Engine.generate`) and on any other loop (the
server's :meth:`~vistune.inference.Engine.stream`), and batches all of them together.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any

from vistune.inference.engine import StreamEvent

#: ``emit(event)``: hands one event (or an exception) from the background loop to the caller's.
Emit = Callable[[Any], None]

_RETURNED = object()


class BackgroundLoop:
    """A new event loop, run by a daemon thread once :meth:`start` is called.

    Build on :attr:`loop` before starting it where an engine binds to the current loop
    when it is constructed (``asyncio.set_event_loop(background.loop)``).
    """

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> BackgroundLoop:
        self._thread.start()
        return self

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coroutine`` on the loop and block until it returns; its result or exception."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def relay(self, producers: Sequence[Callable[[Emit], Awaitable[None]]], completions: int
                    ) -> AsyncIterator[StreamEvent]:  # fmt: skip
        """Run ``await producer(emit)`` for each of ``producers`` on the loop, and yield the
        :class:`StreamEvent` they emit on the caller's loop, as they come.

        Ends when ``completions`` completions have finished (an event with a
        ``finish_reason`` each) or every producer has returned.  A producer's exception is
        raised here.  Closing the iterator early cancels the producers, which is how the
        engines abort a request whose client went away.
        """
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item: Any) -> None:
            try:
                caller.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

        async def run(producer: Callable[[Emit], Awaitable[None]]) -> None:
            try:
                await producer(emit)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                emit(exc)
            else:
                emit(_RETURNED)

        futures = [asyncio.run_coroutine_threadsafe(run(producer), self.loop) for producer in producers]
        running, unfinished = len(futures), completions
        try:
            while unfinished and running:
                item = await queue.get()
                if item is _RETURNED:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    if item.finish_reason:
                        unfinished -= 1
                    yield item
        finally:
            if unfinished:
                for future in futures:
                    future.cancel()

    def stop(self) -> None:
        """Stop the loop and wait for its thread (what runs on the loop is left as it is)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
