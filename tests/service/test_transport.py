"""The lean HTTP transport for chat calls, against scripted loopback servers: framing, keep-alive, faults."""

import asyncio
import shutil
import socket
import ssl
import subprocess
import threading

import pytest

from llamaduo.service.retry import ServiceFault
from llamaduo.service.transport import LeanHTTP, ShardedHTTP, connect

OK_BODY = b'{"choices": [{"message": {"content": "hi"}}]}'


class Scripted:
    """A loopback TCP server that answers each request with the next scripted raw response
    (None: close the connection without answering). Counts connections accepted."""

    def __init__(self, responses, close_after_each=False, tls=None):
        self.responses = list(responses)
        self.tls = tls
        self.close_after_each = close_after_each
        self.connections = 0
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:  # a client that does not trust us hangs up mid-handshake
                conn.close()
                return
        buf = b""
        with conn:
            while self.responses:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + rest[:length])
                buf = rest[length:]
                response = self.responses.pop(0)
                if response is None:
                    return
                conn.sendall(response)
                if self.close_after_each:
                    return

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self):
        self.sock.close()


def ok(extra_headers=b"", body=OK_BODY):
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra_headers + b"Content-Length: %d\r\n\r\n" % len(body) + body


def post(http, n=1):
    async def go():
        try:
            return [await http.post_json("/chat/completions", {"model": "m", "messages": []}) for _ in range(n)]
        finally:
            await http.aclose()

    return asyncio.run(go())


def test_keep_alive_connections_are_reused_and_requests_carry_the_headers():
    srv = Scripted([ok()] * 3)
    replies = post(LeanHTTP(srv.url, {"Authorization": "Bearer k"}, 5.0), n=3)
    assert [r["choices"][0]["message"]["content"] for r in replies] == ["hi"] * 3
    assert srv.connections == 1
    head = srv.requests[0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1") and "Authorization: Bearer k" in head
    assert f"Host: 127.0.0.1:{srv.port}" in head
    srv.close()


def test_a_chunked_reply_and_an_interim_100_continue_are_read_whole():
    body = OK_BODY
    chunked = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n" % 10 + body[:10] + b"\r\n" + b"%x;ext=1\r\n" % (len(body) - 10) + body[10:] + b"\r\n0\r\n\r\n")
    srv = Scripted([chunked, ok()])
    first, second = post(LeanHTTP(srv.url, {}, 5.0), n=2)
    assert first == second and srv.connections == 1  # the chunked reply left the connection clean for the next
    srv.close()


def test_a_connection_the_server_says_it_closes_is_not_reused():
    srv = Scripted([ok(b"Connection: close\r\n"), ok()], close_after_each=True)
    post(LeanHTTP(srv.url, {}, 5.0), n=2)
    assert srv.connections == 2
    srv.close()


def test_a_kept_alive_connection_the_server_dropped_is_replaced_without_a_fault():
    srv = Scripted([ok(), None, ok()])  # answers once, then drops the connection when the next request comes

    async def go(http):
        first = await http.post_json("/chat/completions", {})
        second = await http.post_json("/chat/completions", {})
        await http.aclose()
        return first, second

    first, second = asyncio.run(go(LeanHTTP(srv.url, {}, 5.0)))
    assert first == second and srv.connections == 2
    srv.close()


def test_no_reply_within_the_timeout_is_a_timeout_fault():
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (in the backlog), never answers
    port = silent.getsockname()[1]
    with pytest.raises(ServiceFault) as fault:
        post(LeanHTTP(f"http://127.0.0.1:{port}/v1", {}, 0.3))
    assert fault.value.status == "timeout"
    silent.close()


def test_error_statuses_become_faults_with_retry_after_and_a_spent_limit():
    limited = (b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nx-ratelimit-remaining-requests: 0\r\n"
               b"Content-Length: 27\r\n\r\n{\"error\": {\"message\": \"x\"}}")
    busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
    bad = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno"
    srv = Scripted([limited, busy, bad, ok(body=b"not json")])
    http = LeanHTTP(srv.url, {}, 5.0)
    faults = []

    async def go():
        for _ in range(4):
            try:
                await http.post_json("/chat/completions", {})
            except ServiceFault as f:
                faults.append(f)
        await http.aclose()

    asyncio.run(go())
    assert [(f.status, f.http_status) for f in faults] == [("http_429", 429), ("http_503", 503), ("client_error", 400), ("malformed", None)]
    assert faults[0].retry_after == 2.0 and faults[0].limit_spent and not faults[1].limit_spent
    assert faults[0].message == "http 429: x" and not faults[2].retryable
    srv.close()


def test_a_refused_connection_is_a_connection_fault():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ServiceFault) as fault:
        post(LeanHTTP(f"http://127.0.0.1:{port}/v1", {}, 2.0))
    assert fault.value.status == "connection_error"


def test_a_proxy_named_in_the_environment_routes_calls_through_httpx(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert isinstance(connect("https://api.example.com/v1", {}, 5.0, 8), ShardedHTTP)
    monkeypatch.setenv("NO_PROXY", "api.example.com")
    assert isinstance(connect("https://api.example.com/v1", {}, 5.0, 8), LeanHTTP)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_https_endpoints_are_reached_over_verified_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    srv = Scripted([ok(), ok()], tls=server_ctx)
    url = f"https://127.0.0.1:{srv.port}/v1"
    replies = post(LeanHTTP(url, {}, 5.0, ssl_context=ssl.create_default_context(cafile=str(cert))), n=2)
    assert [r["choices"][0]["message"]["content"] for r in replies] == ["hi", "hi"] and srv.connections == 1
    with pytest.raises(ServiceFault) as untrusted:  # the default trust store does not know this certificate
        post(LeanHTTP(url, {}, 5.0))
    assert untrusted.value.status == "connection_error"
    srv.close()


def test_an_http_1_0_reply_without_a_length_is_read_to_the_end_of_the_connection():
    srv = Scripted([b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK_BODY, ok()], close_after_each=True)
    first, second = post(LeanHTTP(srv.url, {}, 5.0), n=2)
    assert first == second and srv.connections == 2  # not kept alive
    srv.close()
