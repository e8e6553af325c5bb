"""A `SimulatedService` in a child process, for load tests whose own CPU time must leave the server out."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from typing import Any

from llamaduo.demo.simulator import Responder, SimulatedService


class SimulatorProcess:
    """A `SimulatedService` in a child process, so a load test's own CPU time leaves out the
    server's: `with SimulatorProcess(responder, rpm_limit=...) as svc: ... svc.base_url ... svc.stats()`.

    Takes `SimulatedService`'s keyword arguments. The responder must be picklable (a module-level
    function); the child is spawned, not forked, so it shares no threads or locks with the caller.
    """

    def __init__(self, responder: Responder, **kwargs: Any):
        self.responder = responder
        self.kwargs = kwargs
        self.base_url = ""
        self._conn: Any = None
        self._proc: Any = None
        self._lock = threading.Lock()

    def start(self) -> SimulatorProcess:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_child, args=(self.responder, self.kwargs, child), name="simulated-service", daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(60):
            self.stop()
            raise RuntimeError("the simulator process did not start")
        self.base_url = self._conn.recv()
        return self

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._conn.send("stats")
            return self._conn.recv()

    def stop(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError):  # the child may be gone already
            self._conn.send("stop")
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self._conn.close()
        self._proc = None

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve_child(responder: Responder, kwargs: dict[str, Any], conn: Any) -> None:
    """The child's side of `SimulatorProcess`: serve, and answer "stats" until told to stop."""
    svc = SimulatedService(responder, **kwargs).start()
    conn.send(svc.base_url)
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the parent is gone
                break
            if msg != "stats":
                break
            conn.send(svc.stats())
    finally:
        svc.stop()
