"""Chat calls to OpenAI-compatible endpoints as plain JSON POSTs, without the SDK's per-call cost.

Client CPU per chat call, measured on the loopback simulator with 256 calls in flight (2 vCPU):
the openai SDK 2.4 ms (request transformation, response model building, and httpx's connection
pool, which walks its connections for every request: quadratic in their number); httpx alone,
through pools of 4 connections, 0.85 ms; `LeanHTTP` below, 0.12 ms. At a top-tier limit
(10,000 requests a minute) that difference is most of a CPU core, so chat calls go through
`LeanHTTP`: HTTP/1.1 with keep-alive over asyncio's own sockets and TLS, for exactly one kind of
exchange (POST a JSON body, read a JSON reply with a Content-Length or chunked body). When the
environment names a proxy for the endpoint, calls go through httpx instead (`ShardedHTTP`),
which honours it. The SDK stays for the Batch API's few file and batch management calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from llamaduo.service.retry import ServiceFault, fault_for_status

DEFAULT_BASE_URL = "https://api.openai.com/v1"
KEEPALIVE_S = 5.0  # an idle connection older than this is not reused (httpx's default expiry)
SHARD_CONNECTIONS = 4  # httpx pool size in `ShardedHTTP`: its per-request bookkeeping is quadratic in it


def openai_headers(api_key: str) -> dict[str, str]:
    """The headers the openai SDK sends that matter to the service (organization and project
    are read from the same environment variables the SDK reads)."""
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": "llamaduo",
    }
    for var, header in (("OPENAI_ORG_ID", "OpenAI-Organization"), ("OPENAI_PROJECT_ID", "OpenAI-Project")):
        if os.environ.get(var):
            headers[header] = os.environ[var]
    return headers


def connect(base_url: str, headers: dict[str, str], timeout_s: float, connections: int) -> LeanHTTP | ShardedHTTP:
    """`LeanHTTP`, or `ShardedHTTP` when the environment routes the endpoint through a proxy."""
    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    if (proxies.get(parts.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(parts.hostname or ""):
        return ShardedHTTP(base_url, headers, timeout_s, connections)
    return LeanHTTP(base_url, headers, timeout_s)


def _ssl_context() -> Any:
    import ssl

    import httpx

    make = getattr(httpx, "create_ssl_context", None)  # the CA bundle httpx (and so the SDK) trusts
    return make() if make is not None else ssl.create_default_context()


def _decode(status: int, headers: Any, content: bytes) -> Any:
    """The JSON of a 200 reply, or the fault for any other."""
    if status != 200:
        raise fault_for_status(status, headers, f"http {status}: {_error_text(content)}")
    try:
        return json.loads(content)
    except (ValueError, UnicodeDecodeError) as e:  # a 200 whose body is not JSON
        raise ServiceFault("malformed", f"Malformed: reply body is not JSON ({e})"[:300]) from e


def _error_text(content: bytes) -> str:
    try:
        err = json.loads(content).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    except (ValueError, AttributeError, UnicodeDecodeError):
        pass
    return content[:300].decode("utf-8", "replace")


class _Malformed(Exception):
    """The response is not HTTP/1.1 we can read."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `exchange` sends a request and waits for its whole response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, dict[str, str], bytes, bool]] | None = None
        self.lost = False
        self.got_bytes = False
        self.idle_since = 0.0

    # ---- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.got_bytes = True
        self._settle()

    def eof_received(self) -> bool | None:
        self.lost = True
        self._settle()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._settle(exc)

    # ---- one exchange
    def _settle(self, exc: Exception | None = None) -> None:
        w = self.waiter
        if w is None or w.done():
            return
        try:
            done = self._parse()
        except _Malformed as e:
            w.set_exception(e)
            return
        if done is not None:
            w.set_result(done)
        elif self.lost:
            w.set_exception(ConnectionResetError(str(exc) if exc else "the server closed the connection"))

    def _parse(self) -> tuple[int, dict[str, str], bytes, bool] | None:
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return None
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                raise _Malformed(f"not an HTTP status line: {lines[0][:100]!r}")
            status = int(parts[1])
            if 100 <= status < 200:  # an interim response (100 Continue): the real one follows
                del buf[: end + 4]
                continue
            break
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        keep = headers.get("connection", "").lower() != "close" and parts[0] != "HTTP/1.0"
        start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            pos = start
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                try:
                    size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
                except ValueError as e:
                    raise _Malformed("bad chunk size") from e
                if size == 0:
                    trailer_end = buf.find(b"\r\n\r\n", eol)  # after trailers, if any: an empty line
                    if trailer_end < 0:
                        return None
                    del buf[: trailer_end + 4]
                    return status, headers, bytes(body), keep
                if len(buf) < eol + 2 + size + 2:
                    return None
                body += buf[eol + 2 : eol + 2 + size]
                pos = eol + 2 + size + 2
        if "content-length" in headers:
            try:
                n = int(headers["content-length"])
            except ValueError as e:
                raise _Malformed("bad Content-Length") from e
            if len(buf) < start + n:
                return None
            body_bytes = bytes(buf[start : start + n])
            del buf[: start + n]
            return status, headers, body_bytes, keep
        if not self.lost:  # no length: the body runs to the end of the connection
            return None
        body_bytes = bytes(buf[start:])
        buf.clear()
        return status, headers, body_bytes, False


class LeanHTTP:
    """Keep-alive HTTP/1.1 connections to one base URL, reused most recently used first."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout_s: float, ssl_context: Any = None):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base URL {base_url!r}: expected http(s)://host[:port]/path")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = (ssl_context or _ssl_context()) if parts.scheme == "https" else None
        self.path = parts.path.rstrip("/")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        default_port = self.port == (443 if self.ssl else 80)
        fixed = {"Host": host if default_port else f"{host}:{self.port}", **headers, "Accept-Encoding": "identity"}
        self._head = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []
        self._closed = False

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl), self.timeout_s
        )
        return conn

    def _reusable(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost and now - conn.idle_since < KEEPALIVE_S:
                return conn
            assert conn.transport is not None
            conn.transport.close()
        return None

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """POST `body`; the decoded JSON reply, or a `ServiceFault` for any failure of the
        connection, the status or the body."""
        data = json.dumps(body).encode()
        request = f"POST {self.path}{path} HTTP/1.1\r\n{self._head}Content-Length: {len(data)}\r\n\r\n".encode() + data
        try:
            conn = self._reusable()
            if conn is not None:
                try:
                    status, headers, content = await self._exchange(conn, request)
                    return _decode(status, headers, content)
                except ConnectionError:
                    # A kept-alive connection the server had closed: it never read the request.
                    if conn.got_bytes:
                        raise
            status, headers, content = await self._exchange(await self._open(), request)
        except (TimeoutError, asyncio.TimeoutError) as e:
            raise ServiceFault("timeout", f"TimeoutError: no reply within {self.timeout_s:g} s") from e
        except _Malformed as e:
            raise ServiceFault("malformed", f"Malformed: {e}") from e
        except OSError as e:  # refused, reset, TLS failures (ssl.SSLError is an OSError)
            raise ServiceFault("connection_error", f"{type(e).__name__}: {e}"[:300]) from e
        return _decode(status, headers, content)

    async def _exchange(self, conn: _Connection, request: bytes) -> tuple[int, dict[str, str], bytes]:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        conn.waiter, conn.got_bytes = waiter, False
        assert conn.transport is not None
        conn.transport.write(request)
        timer = loop.call_later(self.timeout_s, _expire, waiter)
        try:
            status, headers, content, keep = await waiter
        except BaseException:
            conn.transport.close()  # mid-exchange: the connection's state is unknown
            raise
        finally:
            timer.cancel()
            conn.waiter = None
        if keep and not conn.lost and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.transport.close()
        return status, headers, content

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class ShardedHTTP:
    """httpx for the same calls (used when a proxy is configured): `connections` keep-alive
    connections split into pools of at most `SHARD_CONNECTIONS`, each request to the first pool
    with a free connection."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout_s: float, connections: int):
        import httpx

        self._httpx = httpx
        self.base_url = base_url.rstrip("/")
        per = max(1, min(SHARD_CONNECTIONS, connections))
        shards = -(-connections // per)
        limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
        # One TLS context for all pools: building one reads the CA bundle (~15 ms each).
        make_ctx = getattr(httpx, "create_ssl_context", None)
        extra: dict[str, Any] = {"verify": make_ctx()} if make_ctx is not None else {}
        self._pools = [
            httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s), limits=limits, **extra) for _ in range(shards)
        ]
        self._per = per
        self._busy = [0] * shards

    def _pick(self) -> int:
        # The first pool with a free connection: requests pack into as few pools as the load
        # needs, so their connections stay in use and warm (spread evenly, each would sit idle
        # past the keep-alive expiry and be opened again, at a cost on both sides).
        for i, busy in enumerate(self._busy):
            if busy < self._per:
                return i
        return min(range(len(self._busy)), key=self._busy.__getitem__)  # more callers than connections

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        httpx = self._httpx
        i = self._pick()
        self._busy[i] += 1
        try:
            resp = await self._pools[i].post(self.base_url + path, content=json.dumps(body).encode())
        except httpx.TimeoutException as e:
            raise ServiceFault("timeout", f"{type(e).__name__}: {e}"[:300]) from e
        except httpx.TransportError as e:
            raise ServiceFault("connection_error", f"{type(e).__name__}: {e}"[:300]) from e
        finally:
            self._busy[i] -= 1
        return _decode(resp.status_code, resp.headers, resp.content)

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()
