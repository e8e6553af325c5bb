"""A loopback OpenAI-compatible server whose answers come from a function of the request.

`POST /v1/chat/completions` answers in the OpenAI shape; `POST /v1/messages` in the shape of
Anthropic's native Messages API. The Batch API flow is there too (`POST /v1/files`,
`GET /v1/files/{id}/content`, `POST /v1/batches`, `GET /v1/batches/{id}`): a batch completes
after `batch_polls_to_complete` polls, its output lines answered by the same responder.
It plays the service LLM in the test suite (with faults on demand: 429 with Retry-After,
5xx, slow replies, malformed or truncated JSON) and in `llamaduo demo`, where it is labelled
as a simulator. It binds 127.0.0.1 only and records every request it receives.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[[dict[str, Any]], "str | dict[str, Any]"]


@dataclass
class Fault:
    """One injected misbehaviour, consumed by the next request."""

    kind: str
    status: int = 200
    seconds: float = 0.0
    text: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def rate_limit(retry_after_s: float = 1.0) -> Fault:
        return Fault("rate_limit", 429, headers={"Retry-After": f"{retry_after_s:g}"})

    @staticmethod
    def server_error(status: int = 500) -> Fault:
        return Fault("server_error", status)

    @staticmethod
    def timeout(seconds: float) -> Fault:
        return Fault("timeout", seconds=seconds)

    @staticmethod
    def malformed() -> Fault:
        return Fault("malformed")

    @staticmethod
    def truncated_json() -> Fault:
        return Fault("bad_content", text='{"similarity": {"score": 8')

    @staticmethod
    def bad_content(text: str) -> Fault:
        return Fault("bad_content", text=text)


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default listen backlog (5) resets bursts of connections
    daemon_threads = True


def estimate_tokens(text: str) -> int:
    return len(text) // 4 + 1


def chat_completion(body: dict[str, Any], reply: str) -> dict[str, Any]:
    """The OpenAI chat.completion object answering `body` with `reply`."""
    prompt = json.dumps(body.get("messages", []))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "simulated"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": estimate_tokens(prompt),
            "completion_tokens": estimate_tokens(reply),
            "total_tokens": estimate_tokens(prompt) + estimate_tokens(reply),
        },
    }


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: name -> (filename, bytes)."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    return {
        part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
        for part in msg.iter_parts()
    }


class SimulatedService:
    """`with SimulatedService(responder) as svc: ... svc.base_url ... svc.requests`."""

    def __init__(
        self,
        responder: Responder,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        rpm_limit: int | None = None,
    ):
        self.responder = responder
        self.latency_s = latency_s
        self.rpm_limit = rpm_limit
        self.requests: list[dict[str, Any]] = []
        self.batch_polls_to_complete = 1
        self.files: dict[str, bytes] = {}  # uploaded and produced JSONL, by file id
        self.batches: dict[str, dict[str, Any]] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.outage_status: int | None = None  # set (e.g. 503): every chat call fails so until cleared
        self._faults: deque[Fault] = deque()
        self._window: deque[float] = deque()
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
            return len(self.requests)

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
            if batch["status"] in ("completed", "cancelled"):
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

    def _over_rpm(self) -> float | None:
        """Seconds until a slot frees when the sliding 60 s window is full, else None."""
        if self.rpm_limit is None:
            return None
        now = time.monotonic()
        with self._lock:
            while self._window and now - self._window[0] >= 60.0:
                self._window.popleft()
            if len(self._window) >= self.rpm_limit:
                return 60.0 - (now - self._window[0])
            self._window.append(now)
            return None

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
                record = {"path": self.path, "body": body, "headers": {k.lower(): v for k, v in self.headers.items()}}
                with svc._lock:
                    svc.requests.append(record)
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
                wait = svc._over_rpm()
                if wait is not None:
                    headers = {
                        "Retry-After": f"{max(wait, 0.01):.2f}",
                        "x-ratelimit-remaining-requests": "0",
                        "x-ratelimit-reset-requests": f"{max(wait, 0.01):.2f}s",
                    }
                    self._error(429, "rate limit reached (simulated)", headers)
                    return
                if svc.outage_status is not None:
                    self._error(svc.outage_status, "service unavailable (simulated outage)")
                    return
                fault = svc._next_fault()
                if svc.latency_s:
                    time.sleep(svc.latency_s)
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
                if isinstance(reply, dict):
                    self._send(200, json.dumps(reply).encode())
                    return
                prompt = json.dumps(body.get("messages", []))
                if anthropic:  # the native Messages API shape
                    out = {
                        "id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant",
                        "model": body.get("model", "simulated"), "content": [{"type": "text", "text": reply}],
                        "stop_reason": "end_turn", "stop_sequence": None,
                        "usage": {"input_tokens": estimate_tokens(prompt), "output_tokens": estimate_tokens(reply)},
                    }
                    self._send(200, json.dumps(out).encode())
                    return
                self._send(200, json.dumps(chat_completion(body, reply)).encode())

        return Handler
