"""Running the application with uvicorn, with a graceful shutdown.

On SIGINT/SIGTERM uvicorn stops accepting connections and waits for the responses in
progress (streams included) before the application's shutdown closes the engine.  The
server here also flips the admission to draining first, so a request that still gets
in on an open connection is answered 503 instead of being started.
"""

from __future__ import annotations

import threading
import time
from typing import Any

#: How long a shutdown waits for requests in flight before cancelling them.
GRACEFUL_SHUTDOWN_S = 60


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, marking the application as draining when shutdown starts."""

        def __init__(self, config: Any, admission: Any):
            super().__init__(config)
            self.admission = admission

        async def shutdown(self, sockets=None) -> None:
            if self.admission is not None:
                self.admission.start_draining()
            await super().shutdown(sockets=sockets)

    return DrainingServer


def make_server(app: Any, host: str, port: int, *, log_level: str = "info") -> Any:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            lifespan="on", access_log=log_level == "debug")  # fmt: skip
    return _server_class()(config, getattr(app.state, "admission", None))


def serve(app: Any, host: str, port: int, *, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted (blocking)."""
    make_server(app, host, port, log_level=log_level).run()


class ServerThread:
    """A server running in a background thread (tests, notebooks): ``start()``, ``url``, ``stop()``.

    ``port=0`` picks a free port; :attr:`port` holds the one chosen once started.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
        self.server = make_server(app, host, port, log_level=log_level)
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="vistune-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def begin_shutdown(self) -> None:
        """Start a graceful shutdown (as SIGTERM would) without waiting for it."""
        self.server.should_exit = True

    def stop(self, timeout: float = 60) -> None:
        self.begin_shutdown()
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
