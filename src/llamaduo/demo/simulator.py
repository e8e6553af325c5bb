"""A loopback OpenAI-compatible server whose answers come from a function of the request.

`/v1/chat/completions` answers in OpenAI's shape, `/v1/messages` in Anthropic's (`faults.anthropic_message`,
tool_use blocks included). Every request's body is kept in `requests` (unless `record=False`). The Batch API
(`/v1/files`, `/v1/batches`): each batch completes after `batch_polls_to_complete` polls, answered
by the same responder; one over `batch_max_requests` lines or `batch_max_bytes` fails as OpenAI's.
It plays the service LLM in the test suite (faults on demand, see `faults`) and in `llamaduo demo`,
where it is labelled as a simulator; for load tests it draws latencies, answers a share with 429s
and 5xx, and enforces RPM/TPM limits (`sim_process` runs it in a child). Binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llamaduo.demo.faults import (
    ErrorReply,
    Fault,
    Latency,
    _multipart,
    anthropic_message,
    chat_completion,
    rate_limit_tokens,
)

Responder = Callable[[dict[str, Any]], "str | dict[str, Any] | ErrorReply"]


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default listen backlog (5) resets bursts of connections
    daemon_threads = True


class SimulatedService:
    """`with SimulatedService(responder) as svc: ... svc.base_url ... svc.requests`."""

    def __init__(
        self,
        responder: Responder,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        latency: Latency | str | None = None,
        fault_rate: float = 0.0,
        fault_retry_after_s: float = 1.0,
        seed: int = 0,
        record: bool = True,
        batch_max_requests: int | None = None,
        batch_max_bytes: int | None = None,
    ):
        self.responder = responder
        self.latency_s = latency_s
        self.latency = Latency.parse(latency) if isinstance(latency, str) else latency or Latency.fixed(latency_s)
        self.rpm_limit, self.tpm_limit = rpm_limit, tpm_limit
        # A share `fault_rate` of chat requests is refused at once, half with a 429 carrying
        # Retry-After (a hiccup: the limit is not spent, so no x-ratelimit-remaining-* is 0),
        # half with a 5xx. Refused requests, like those over a limit, count in no window.
        self.fault_rate, self.fault_retry_after_s = fault_rate, fault_retry_after_s
        self.record = record  # False keeps no copy of each request (long load tests)
        self.batch_max_requests, self.batch_max_bytes = batch_max_requests, batch_max_bytes
        self.requests: list[dict[str, Any]] = []
        self.batch_polls_to_complete = 1
        self.files: dict[str, bytes] = {}  # uploaded and produced JSONL, by file id
        self.batches: dict[str, dict[str, Any]] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.counts = {"received": 0, "ok": 0, "limited_rpm": 0, "limited_tpm": 0, "injected_429": 0, "injected_5xx": 0}
        self.first_ok_at: float | None = None  # arrival (monotonic) of the first and last request answered 200
        self.last_ok_at: float | None = None
        self._rng = random.Random(seed)
        self.outage_status: int | None = None  # set (e.g. 503): every chat call fails so until cleared
        self._faults: deque[Fault] = deque()
        self._window: deque[float] = deque()
        self._token_window: deque[tuple[float, int]] = deque()
        self._window_tokens = 0
        self._lock = threading.Lock()
        self._server = _Server((host, port), self._handler())
        self._thread: threading.Thread | None = None

    # ---- lifecycle
    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> SimulatedService:
        # A short poll interval makes stop() quick (tests start and stop many servers).
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="simulated-service", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> SimulatedService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- control
    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests) if self.record else self.counts["received"]

    def stats(self) -> dict[str, Any]:
        """Counts of what was received and answered, for load tests."""
        with self._lock:
            return {
                **self.counts, "requests": len(self.requests) if self.record else self.counts["received"],
                "max_in_flight": self.max_in_flight, "batches": len(self.batches),
                "ok_span_s": (self.last_ok_at - self.first_ok_at) if self.first_ok_at is not None else 0.0,
            }

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    # ---- Batch API
    def _add_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        fid = f"file-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self.files[fid] = data
        return {
            "id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
            "filename": filename, "purpose": purpose, "status": "processed",
        }

    def _create_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        batch = {
            "id": f"batch_{uuid.uuid4().hex[:12]}", "object": "batch", "endpoint": body.get("endpoint"),
            "input_file_id": body.get("input_file_id"), "completion_window": body.get("completion_window", "24h"),
            "status": "validating", "created_at": int(time.time()), "output_file_id": None, "error_file_id": None,
            "errors": None, "metadata": body.get("metadata"), "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        with self._lock:
            data = self.files.get(str(body.get("input_file_id")), b"")
            n = sum(1 for line in data.splitlines() if line.strip())
            if self.batch_max_requests is not None and n > self.batch_max_requests:
                problem = f"{n} requests, over the limit of {self.batch_max_requests}"
            elif self.batch_max_bytes is not None and len(data) > self.batch_max_bytes:
                problem = f"{len(data)} bytes, over the limit of {self.batch_max_bytes}"
            else:
                problem = None
            if problem:  # refused at validation, as the provider does
                batch.update(status="failed", errors={"object": "list", "data": [
                    {"code": "batch_too_large", "message": f"input file has {problem}", "param": None, "line": None}]})
            self.batches[batch["id"]] = {"object": batch, "polls": 0}
        return batch

    def _poll_batch(self, batch_id: str) -> dict[str, Any] | None:
        """One retrieve: the batch moves on, and runs every line through the responder on completion."""
        with self._lock:
            entry = self.batches.get(batch_id)
            if entry is None:
                return None
            entry["polls"] += 1
            batch = entry["object"]
            if batch["status"] in ("completed", "cancelled", "failed"):
                return dict(batch)
            if entry["polls"] < self.batch_polls_to_complete:
                batch["status"] = "in_progress"
                return dict(batch)
            data = self.files[batch["input_file_id"]]
        out = []
        for line in data.decode().splitlines():
            if not line.strip():
                continue
            req = json.loads(line)
            reply = self.responder(req["body"])
            body = reply if isinstance(reply, dict) else chat_completion(req["body"], reply)
            out.append({
                "id": f"batch_req_{uuid.uuid4().hex[:12]}", "custom_id": req["custom_id"],
                "response": {"status_code": 200, "request_id": uuid.uuid4().hex[:12], "body": body}, "error": None,
            })
        output = self._add_file("".join(json.dumps(o) + "\n" for o in out).encode(), "batch_output.jsonl", "batch_output")
        with self._lock:
            batch.update(status="completed", output_file_id=output["id"], completed_at=int(time.time()),
                         request_counts={"total": len(out), "completed": len(out), "failed": 0})
            return batch

    def _over_limit(self, body: dict[str, Any], now: float) -> tuple[float, str] | None:
        """(seconds until the request would fit, which limit) when admitting it would put more
        than the limit in the sliding 60 s window; else None, and the request is counted."""
        if self.rpm_limit is None and self.tpm_limit is None:
            return None
        tokens = rate_limit_tokens(body) if self.tpm_limit is not None else 0
        with self._lock:
            while self._window and now - self._window[0] >= 60.0:
                self._window.popleft()
            while self._token_window and now - self._token_window[0][0] >= 60.0:
                self._window_tokens -= self._token_window.popleft()[1]
            if self.rpm_limit is not None and len(self._window) >= self.rpm_limit:
                self.counts["limited_rpm"] += 1
                return 60.0 - (now - self._window[0]), "requests"
            if self.tpm_limit is not None and self._window_tokens + tokens > self.tpm_limit:
                self.counts["limited_tpm"] += 1
                freed, wait = 0, 60.0
                for t, n in self._token_window:  # the oldest entries leave the window first
                    freed += n
                    if self._window_tokens - freed + tokens <= self.tpm_limit:
                        wait = 60.0 - (now - t)
                        break
                return wait, "tokens"
            self._window.append(now)
            if self.tpm_limit is not None:
                self._token_window.append((now, tokens))
                self._window_tokens += tokens
            return None

    def _draw(self) -> tuple[float, int | None]:
        """This request's latency and random fault: None, or the status to refuse it with."""
        with self._lock:
            latency = self.latency.sample(self._rng)
            if not (self.fault_rate and self._rng.random() < self.fault_rate):
                return latency, None
            if self._rng.random() < 0.5:
                self.counts["injected_429"] += 1
                return latency, 429
            self.counts["injected_5xx"] += 1
            return latency, self._rng.choice((500, 502, 503))

    def _answered(self, arrived: float) -> None:
        with self._lock:
            self.counts["ok"] += 1
            if self.first_ok_at is None or arrived < self.first_ok_at:
                self.first_ok_at = arrived
            if self.last_ok_at is None or arrived > self.last_ok_at:
                self.last_ok_at = arrived

    # ---- HTTP
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        svc = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
                err = {"error": {"message": message, "type": "simulated_error", "code": status}}
                self._send(status, json.dumps(err).encode(), headers)

            def _record(self, body: dict[str, Any]) -> None:
                with svc._lock:
                    svc.counts["received"] += 1
                    if svc.record:
                        svc.requests.append({"path": self.path, "body": body, "headers": {k.lower(): v for k, v in self.headers.items()}})

            def do_GET(self) -> None:
                path = self.path.rstrip("/")
                if "/batches/" in path:
                    self._record({})
                    batch = svc._poll_batch(path.rsplit("/", 1)[1])
                    if batch is None:
                        self._error(404, f"no batch {path}")
                    else:
                        self._send(200, json.dumps(batch).encode())
                elif "/files/" in path and path.endswith("/content"):
                    self._record({})
                    data = svc.files.get(path.split("/")[-2])
                    if data is None:
                        self._error(404, f"no file {path}")
                    else:
                        self._send(200, data)
                elif path.endswith("/models"):
                    body = {"object": "list", "data": [{"id": "simulated", "object": "model", "owned_by": "llamaduo"}]}
                    self._send(200, json.dumps(body).encode())
                else:
                    self._error(404, f"no route {self.path}")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/").endswith("/files"):
                    fields = _multipart(self.headers.get("Content-Type", ""), raw)
                    filename, data = fields.get("file", (None, b""))
                    purpose = fields.get("purpose", (None, b""))[1].decode()
                    self._record({"purpose": purpose, "filename": filename, "bytes": len(data)})
                    self._send(200, json.dumps(svc._add_file(data, filename or "upload.jsonl", purpose)).encode())
                    return
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._error(400, "request body is not JSON")
                    return
                with svc._lock:
                    svc.counts["received"] += 1
                    if svc.record:
                        svc.requests.append({"path": self.path, "body": body, "headers": {k.lower(): v for k, v in self.headers.items()}})
                    svc.in_flight += 1
                    svc.max_in_flight = max(svc.max_in_flight, svc.in_flight)
                try:
                    self._answer(body)
                finally:
                    with svc._lock:
                        svc.in_flight -= 1

            def _answer(self, body: dict[str, Any]) -> None:
                path = self.path.rstrip("/")
                if path.endswith("/batches"):
                    self._send(200, json.dumps(svc._create_batch(body)).encode())
                    return
                if "/batches/" in path and path.endswith("/cancel"):
                    entry = svc.batches.get(path.split("/")[-2])
                    if entry is None:
                        self._error(404, f"no batch {path}")
                        return
                    with svc._lock:
                        entry["object"]["status"] = "cancelled"
                    self._send(200, json.dumps(entry["object"]).encode())
                    return
                anthropic = path.endswith("/messages") and not path.endswith("/chat/completions")
                if not (anthropic or path.endswith("/chat/completions")):
                    self._error(404, f"no route {self.path}")
                    return
                arrived = time.monotonic()
                latency, refuse = svc._draw()
                if refuse == 429:
                    self._error(429, "injected rate_limit (the service is busy)", {"Retry-After": f"{svc.fault_retry_after_s:g}"})
                    return
                if refuse is not None:
                    self._error(refuse, "injected server_error")
                    return
                over = svc._over_limit(body, arrived)
                if over is not None:
                    wait, which = over
                    headers = {
                        "Retry-After": f"{max(wait, 0.01):.2f}",
                        f"x-ratelimit-remaining-{which}": "0",
                        f"x-ratelimit-reset-{which}": f"{max(wait, 0.01):.2f}s",
                    }
                    self._error(429, f"rate limit reached ({which} per minute, simulated)", headers)
                    return
                if svc.outage_status is not None:
                    self._error(svc.outage_status, "service unavailable (simulated outage)")
                    return
                fault = svc._next_fault()
                if latency:
                    time.sleep(latency)
                content: str | None = None
                if fault is not None:
                    if fault.kind in ("rate_limit", "server_error"):
                        self._error(fault.status, f"injected {fault.kind}", fault.headers)
                        return
                    if fault.kind == "timeout":
                        time.sleep(fault.seconds)
                    elif fault.kind == "malformed":
                        self._send(200, b'{"id": "x", "choices": [ this is not json')
                        return
                    elif fault.kind == "bad_content":
                        content = fault.text
                reply = svc.responder(body) if content is None else content
                if isinstance(reply, ErrorReply):
                    self._error(reply.status, reply.message)
                    return
                svc._answered(arrived)
                if isinstance(reply, dict):
                    self._send(200, json.dumps(reply).encode())
                    return
                # A dict is sent as it is (e.g. `anthropic_message` with tool_use blocks); text in the path's shape.
                out = anthropic_message(body, reply) if anthropic else chat_completion(body, reply)
                self._send(200, json.dumps(out).encode())

        return Handler
