"""`llamaduo capture`: grow a coverage dataset from the traffic an application already sends.

An OpenAI-compatible pass-through proxy in front of the service LLM. The application points
its `base_url` at the proxy; every request is forwarded unchanged (the caller's own
Authorization header goes to the upstream and nowhere else), the reply is relayed unchanged
(SSE chunks as they arrive when streaming), and each completed chat exchange is appended to
a JSONL file in the messages format that `llamaduo prepare` reads:

    {"messages": [...request messages..., {"role": "assistant", "content": reply, "tool_calls": [...]}],
     "category": <x-llamaduo-category header or "default">, "model": <model that answered>,
     "tools": ..., "tool_choice": ..., "parallel_tool_calls": ..., "response_format": ...}

Tool turns, the assistant's tool calls (streamed ones assembled from their deltas) and the request's
structure fields are kept, so a structured task's traffic loads as its coverage data.

Recorded text is redacted (API keys, tokens, passwords, card numbers, IBANs, e-mail addresses
and phone numbers by default, each as a typed placeholder; or any list of regexes). No header is
ever recorded, so the caller's API key never reaches the file; the file follows the umask.
"""

import contextlib
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from llamaduo import redact as redact_mod
from llamaduo.errors import UserError

log = logging.getLogger("llamaduo.capture")

# The default redaction: secrets (API keys, cloud and VCS tokens, bearer tokens, passwords),
# card numbers (Luhn-checked), IBANs (mod-97), e-mail addresses and phone numbers, each as a typed
# placeholder such as [REDACTED:api_key]; see `llamaduo.redact`.
DEFAULT_KINDS = redact_mod.DEFAULT_KINDS

# Hop-by-hop headers are per connection; content-length/encoding are recomputed by the relay.
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "content-encoding",
    "accept-encoding",
}


def make_redactor(patterns: list[str], mask: str = "[REDACTED]") -> Callable[[str], str]:
    """A redaction function that replaces every match of any of `patterns` with `mask`."""
    compiled = [re.compile(p) for p in patterns]

    def redact(text: str) -> str:
        for rx in compiled:
            text = rx.sub(mask, text)
        return text

    return redact


def default_redact(text: str) -> str:
    """Mask every kind of secret and personal data `llamaduo.redact` knows, each with its typed placeholder."""
    return redact_mod.redact(text)


class CaptureWriter:
    """Appends records to a JSONL file; one locked write + flush per line keeps lines whole."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.count = 0

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock, open(self.out, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            self.count += 1


def _text(content: Any) -> str | None:
    """Message content as text: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(parts) if parts else None
    return None


STRUCTURE_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")  # as `coverage` reads them


def _redact_arguments(arguments: Any, redact: Callable[[str], str]) -> Any:
    """A call's JSON arguments with every string value redacted (the text stays JSON)."""
    if not isinstance(arguments, str):
        return arguments

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return redact(v)
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    try:
        return json.dumps(walk(json.loads(arguments)), ensure_ascii=False)
    except ValueError:
        return redact(arguments)


def _calls(raw: Any, redact: Callable[[str], str]) -> list[dict[str, Any]] | None:
    """Tool calls in OpenAI's shape, arguments redacted; None when they are not function calls."""
    if not isinstance(raw, list):
        return None
    out = []
    for c in raw:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return None
        out.append({"id": c.get("id") or f"call_{len(out)}", "type": "function",
                    "function": {"name": fn["name"], "arguments": _redact_arguments(fn.get("arguments", "{}"), redact)}})
    return out


def _turn(m: Any, redact: Callable[[str], str]) -> dict[str, Any] | None:
    """One chat turn as a coverage record holds it, or None when it is not text (images, audio)."""
    if not isinstance(m, dict):
        return None
    role = "system" if m.get("role") == "developer" else m.get("role")
    calls = _calls(m.get("tool_calls"), redact) if role == "assistant" and m.get("tool_calls") else None
    text = _text(m.get("content"))
    if text is None and calls and m.get("content") is None:
        text = ""
    if role not in ("system", "user", "assistant", "tool") or text is None:
        return None
    if role == "assistant" and m.get("tool_calls") and calls is None:
        return None
    turn: dict[str, Any] = {"role": role, "content": redact(text)}
    if calls:
        turn["tool_calls"] = calls
    if role == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            return None
        turn["tool_call_id"] = m["tool_call_id"]
    return turn


def build_record(
    request: dict[str, Any], reply: "str | dict[str, Any]", model: str | None, category: str,
    redact: Callable[[str], str],
) -> dict[str, Any] | None:
    """The coverage record of one exchange, or None when it is not a text chat.

    `reply` is the assistant's text, or its message (`content` and any `tool_calls`). The request's
    tool turns and calls are kept, and so are its structure fields (`tools`, `tool_choice`,
    `parallel_tool_calls`, `response_format`), so `coverage.load_coverage` reads the task back."""
    msgs = request.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return None
    out = []
    for m in msgs:
        turn = _turn(m, redact)
        if turn is None:
            return None  # images and other non-text parts are not coverage pairs
        out.append(turn)
    answer = _turn({"role": "assistant", **(reply if isinstance(reply, dict) else {"content": reply})}, redact)
    if answer is None or not (answer["content"] or answer.get("tool_calls")):
        return None
    out.append(answer)
    record = {"messages": out, "category": category or "default", "model": model or request.get("model")}
    record.update({k: request[k] for k in STRUCTURE_FIELDS if request.get(k) is not None})
    return record


class _SSEText:
    """Assembles choice 0's text and tool calls from OpenAI chat-completion SSE bytes as they pass through."""

    def __init__(self) -> None:
        self._buf = b""
        self.parts: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}  # tool-call deltas by index: id and name first, then arguments
        self.model: str | None = None
        self.done = False

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                obj = json.loads(payload)
                self.model = obj.get("model") or self.model
                for ch in obj.get("choices") or []:
                    if ch.get("index", 0) == 0:
                        d = ch.get("delta") or {}
                        self.parts.append(d.get("content") or "")
                        for c in d.get("tool_calls") or []:
                            self._call(c)

    def _call(self, c: dict[str, Any]) -> None:
        call = self.calls.setdefault(int(c.get("index", len(self.calls))),
                                     {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        call["id"] = c.get("id") or call["id"]
        fn = c.get("function") or {}
        call["function"]["name"] += fn.get("name") or ""
        call["function"]["arguments"] += fn.get("arguments") or ""

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def message(self) -> dict[str, Any]:
        """The streamed assistant message: its content and tool calls."""
        calls = [self.calls[k] for k in sorted(self.calls)]
        return {"content": self.text, **({"tool_calls": calls} if calls else {})}


def _error(status: int, message: str, code: str):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": "proxy_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def create_capture_app(
    upstream: str,
    out: Path,
    redact: Callable[[str], str] = default_redact,
    category_header: str = "x-llamaduo-category",
    timeout_s: float = 600.0,
):
    """FastAPI app: `/v1/<path>` is forwarded to `<upstream>/<path>`; chat completions are recorded.

    `upstream` is the base URL as the OpenAI SDK takes it (e.g. https://api.openai.com/v1).
    """
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import Response, StreamingResponse

    upstream = upstream.rstrip("/")
    writer = CaptureWriter(out)
    category_header = category_header.lower()
    state: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["client"] = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0))
        try:
            yield
        finally:
            await state["client"].aclose()

    app = FastAPI(title="llamaduo capture proxy", lifespan=lifespan)
    app.state.writer = writer

    def record(body: dict[str, Any], reply: "str | dict[str, Any]", model: str | None, category: str) -> None:
        rec = build_record(body, reply, model, category, redact)
        if rec is None:
            log.info("exchange not recorded: not a text chat")
            return
        writer.append(rec)

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def forward(path: str, request: Request):
        raw = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP and k.lower() != category_header}
        headers["accept-encoding"] = "identity"  # relay bytes we can read for the record
        category = request.headers.get(category_header) or "default"
        url = f"{upstream}/{path}"
        if request.url.query:
            url += "?" + request.url.query
        body: dict[str, Any] | None = None
        if path.rstrip("/") == "chat/completions" and request.method == "POST":
            with contextlib.suppress(ValueError):
                parsed = json.loads(raw)
                body = parsed if isinstance(parsed, dict) else None
        client = state["client"]
        req = client.build_request(request.method, url, content=raw, headers=headers)
        try:
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            log.warning("upstream unreachable: %s", type(e).__name__)
            return _error(502, f"upstream {upstream} unreachable: {type(e).__name__}", "upstream_unreachable")
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
        is_sse = resp.headers.get("content-type", "").startswith("text/event-stream")

        if body is not None and body.get("stream") and is_sse:
            sse = _SSEText()

            async def relay() -> AsyncIterator[bytes]:
                recorded = False
                try:
                    async for chunk in resp.aiter_bytes():
                        sse.feed(chunk)
                        if sse.done and not recorded and resp.status_code == 200:
                            # Before the last chunk goes out: a client that disconnects on `[DONE]`
                            # cancels this generator at its next `yield`.
                            record(body, sse.message, sse.model, category)
                            recorded = True
                        yield chunk
                finally:
                    await resp.aclose()

            return StreamingResponse(relay(), status_code=resp.status_code, headers=out_headers)

        try:
            content = await resp.aread()
        finally:
            await resp.aclose()
        if body is not None and resp.status_code == 200:
            with contextlib.suppress(ValueError, AttributeError, IndexError, KeyError, TypeError):
                reply = json.loads(content)
                message = reply["choices"][0]["message"]
                if isinstance(message, dict):
                    record(body, message, reply.get("model"), category)
        return Response(content=content, status_code=resp.status_code, headers=out_headers)

    return app


def capture(
    upstream: str,
    out: Path,
    host: str = "127.0.0.1",
    port: int = 8001,
    redact_patterns: list[str] | None = None,
    category_header: str = "x-llamaduo-category",
    redact_kinds: list[str] | None = None,
) -> None:
    """Run the capture proxy until interrupted. `redact_patterns` replaces the default redaction;
    `redact_kinds` picks which of `llamaduo.redact.FINDERS` the default masks (all when None)."""
    import uvicorn

    if redact_patterns is not None:
        redact = make_redactor(redact_patterns)
    elif redact_kinds is not None:
        try:
            redact = redact_mod.make_redactor(redact_kinds)
        except ValueError as e:
            raise UserError(f"--redact-kind: {e}") from None
    else:
        redact = default_redact
    app = create_capture_app(upstream, out, redact=redact, category_header=category_header)
    log.info("capturing %s -> %s on http://%s:%s/v1", upstream, out, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
