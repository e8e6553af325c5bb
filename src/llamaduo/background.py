"""uvicorn in a background thread, on a port bound first: how the demo, the tests and the
benchmarks run `llamaduo serve`'s app in-process."""

import threading
import time
from typing import Any

from llamaduo.errors import UserError


class BackgroundServer:
    """uvicorn in a daemon thread; `start()` returns once the socket is bound."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, model_name: str = "", sock: Any = None):
        import uvicorn

        self.model_name = model_name
        self.host = host
        # A connection still open at shutdown (a client that never reads its stream) must not hold it forever.
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5))
        # A socket bound by the caller (see `bind_port`) leaves no gap for another process to take the port.
        sockets = [sock] if sock is not None else None
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets}, name="llamaduo-serve", daemon=True)

    def start(self, timeout_s: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"server on {self.host} did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def wait(self) -> None:
        """Block until the server stops. Joining in short slices keeps Ctrl-C (SIGINT, delivered to the
        main thread) arriving here as KeyboardInterrupt; uvicorn installs no handlers off the main thread."""
        while self.thread.is_alive():
            self.thread.join(timeout=0.25)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.thread.is_alive():  # still draining: close what is left now
            self.server.force_exit = True
            self.thread.join(timeout=5)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bind_port(host: str, preferred: int, span: int = 50) -> tuple[Any, int]:
    """Bind the first free port from `preferred` on (a stable address for copy-paste snippets).

    Returns the bound socket (hand it to `BackgroundServer`) and its port."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in range(preferred, preferred + span):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            continue
        return sock, port
    raise UserError(f"no free port on {host} in {preferred}-{preferred + span - 1}; pass --port")
