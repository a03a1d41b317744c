"""Running the app under uvicorn: on a socket bound first (a busy port is one clear error), in
the foreground with a graceful Ctrl-C (`tformer serve`), or on a thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from tformer_cli.errors import TformerError

DRAIN_SECONDS = 30.0  # after Ctrl-C, how long requests in flight may take to finish


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a TformerError saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise TformerError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host"
        ) from None


def _config(app: FastAPI, drain: float) -> uvicorn.Config:
    # The app logs one line per request itself; uvicorn's own loggers are left to the caller.
    return uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=drain,
    )


class _Server(uvicorn.Server):
    """uvicorn's server, telling on_exit when a first Ctrl-C starts the drain."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        """uvicorn's signal handler: a first signal starts the drain (said once), a second ends."""
        if not self.should_exit and self.on_exit is not None:
            self.on_exit()
        super().handle_exit(sig, frame)


def serve_forever(
    app: FastAPI, sock: socket.socket, on_exit: Callable[[], None] | None = None
) -> None:
    """Serve on sock until Ctrl-C (or SIGTERM): then stop accepting, let the requests in flight
    finish (DRAIN_SECONDS at most; a second Ctrl-C stops at once) and stop the decoding threads.
    uvicorn raises the signal again when it is done, so a Ctrl-C ends as KeyboardInterrupt."""
    _Server(_config(app, DRAIN_SECONDS), on_exit).run(sockets=[sock])


class ServerThread:
    """The app served by uvicorn on a thread of this process, on a free port of 127.0.0.1.

    with ServerThread(create_app(models)) as server:
        OpenAI(base_url=server.url + "/v1", api_key="-")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """http://host:port of the running server."""
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        sock = bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(_config(self.app, drain=5.0))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="tformer-serve", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        assert self.server is not None and self.thread is not None
        self.server.should_exit = True
        self.thread.join(30)
