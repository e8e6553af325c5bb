"""The capture proxy in front of a real loopback service LLM, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from llamaduo.capture import build_record, create_capture_app, default_redact, make_redactor
from llamaduo.config import InferConfig, ServeConfig
from llamaduo.demo.simulator import Fault, SimulatedService
from llamaduo.serve import BackgroundServer, create_app

CANARY = "sk-canary-123"


def echo(request: dict) -> str:
    return "reply to: " + request["messages"][-1]["content"]


@pytest.fixture
def upstream():
    with SimulatedService(echo) as svc:
        yield svc


@pytest.fixture
def proxy(upstream, tmp_path):
    out = tmp_path / "captured.jsonl"
    with BackgroundServer(create_capture_app(upstream.base_url, out)) as srv:
        yield srv, out


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_exchange_is_forwarded_unchanged_and_recorded_as_messages(proxy, upstream):
    srv, out = proxy
    client = openai.OpenAI(base_url=srv.base_url, api_key=CANARY, max_retries=0)
    r = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        temperature=0.3,
        extra_headers={"x-llamaduo-category": "brainstorm"},
    )
    assert r.choices[0].message.content == "reply to: Name a colour."
    sent = upstream.requests[-1]
    assert sent["headers"]["authorization"] == f"Bearer {CANARY}"
    assert sent["body"]["temperature"] == 0.3 and sent["body"]["model"] == "gpt-4o-mini"
    assert "x-llamaduo-category" not in sent["headers"]
    [rec] = lines(out)
    assert rec == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "reply to: Name a colour."},
        ],
        "category": "brainstorm",
        "model": "gpt-4o-mini",
    }


def test_pii_is_redacted_in_the_record_but_not_in_the_forwarded_request(proxy, upstream):
    srv, out = proxy
    client = openai.OpenAI(base_url=srv.base_url, api_key=CANARY, max_retries=0)
    prompt = "Mail ana.costa@example.com or call +351 912 345 678 about order 12345678 from 2024-01-15."
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}])
    assert upstream.requests[-1]["body"]["messages"][0]["content"] == prompt
    [rec] = lines(out)
    recorded = rec["messages"][0]["content"]
    assert "ana.costa@example.com" not in recorded and "912 345 678" not in recorded
    assert "[REDACTED:email]" in recorded and "[REDACTED:phone]" in recorded
    assert "12345678" in recorded and "2024-01-15" in recorded  # task content survives
    assert rec["messages"][1]["content"].startswith("reply to: Mail [REDACTED:email]")
    assert rec["category"] == "default"


def test_callers_key_never_reaches_the_captured_file(proxy, upstream, tmp_path):
    srv, out = proxy
    client = openai.OpenAI(base_url=srv.base_url, api_key=CANARY, max_retries=0)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
    upstream.inject(Fault.server_error(500))
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "again"}])
    client.models.list()
    assert len(lines(out)) == 1  # the failed exchange and the models call are not recorded
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert CANARY.encode() not in f.read_bytes(), f


def test_concurrent_exchanges_append_whole_lines(proxy):
    srv, out = proxy

    async def many() -> list[str]:
        client = openai.AsyncOpenAI(base_url=srv.base_url, api_key=CANARY, max_retries=0)
        rs = await asyncio.gather(
            *[
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i} " + "x" * 2000}])
                for i in range(24)
            ]
        )
        await client.close()
        return [r.choices[0].message.content for r in rs]

    replies = asyncio.run(many())
    recs = lines(out)
    assert len(recs) == 24
    assert sorted(r["messages"][-1]["content"] for r in recs) == sorted(replies)


def test_streamed_reply_is_relayed_in_chunks_and_recorded_whole(tmp_path):
    # The upstream here is llamaduo's own server, which streams real SSE chunks.
    def gen(prompts, sampling, seed):
        return [type("Out", (), {"text": "streamed answer about " + m[-1].content})() for _, m in prompts]

    out = tmp_path / "captured.jsonl"
    upstream_app = create_app(gen, ServeConfig(), "student", defaults=InferConfig(max_new_tokens=8))
    with BackgroundServer(upstream_app) as up, BackgroundServer(create_capture_app(up.base_url, out)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key=CANARY, max_retries=0)
        stream = client.chat.completions.create(
            model="student", messages=[{"role": "user", "content": "tides"}], stream=True,
            extra_headers={"x-llamaduo-category": "qa"},
        )
        chunks = list(stream)
    assert len(chunks) >= 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "streamed answer about tides"
    [rec] = lines(out)
    assert rec["messages"][-1] == {"role": "assistant", "content": "streamed answer about tides"}
    assert rec["category"] == "qa" and rec["model"] == "student"


def test_custom_redaction_patterns_replace_the_default():
    redact = make_redactor([r"ACME-\d+"])
    rec = build_record({"messages": [{"role": "user", "content": "ticket ACME-42 for bob@example.com"}]}, "ok", "m", "c", redact)
    assert rec["messages"][0]["content"] == "ticket [REDACTED] for bob@example.com"
    assert default_redact("call 555-123-4567") == "call [REDACTED:phone]"


def test_image_exchanges_are_not_recorded_and_tool_turns_are():
    tool = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x", "tool_call_id": "1"}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}]}
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert build_record(tool, "r", None, "c", default_redact)["messages"][1] == {"role": "tool", "content": "x",
                                                                                  "tool_call_id": "1"}
    assert build_record(image, "r", None, "c", default_redact) is None
    assert build_record(parts, "r", None, "c", default_redact)["messages"][0]["content"] == "ab"


def test_captured_file_is_a_coverage_dataset_for_prepare(proxy, tmp_path):
    from llamaduo.config import Config
    from llamaduo.data import load_examples
    from llamaduo.prepare import prepare
    from llamaduo.store import RunStore

    srv, out = proxy
    client = openai.OpenAI(base_url=srv.base_url, api_key=CANARY, max_retries=0)
    for i in range(10):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "system", "content": "Extract JSON."}, {"role": "user", "content": f"Order {i} mugs, tel 555-123-4567"}],
            extra_headers={"x-llamaduo-category": "extract" if i % 2 else "chat"},
        )
    cfg = Config(name="captured", runs_dir=tmp_path / "runs", data={"input": str(out), "test_fraction": 0.2})
    store = RunStore(cfg.run_dir)
    res = prepare(cfg, store)
    examples = load_examples(store.train_path) + load_examples(store.test_path)
    assert res.train_count + res.test_count == 10 and res.test_count >= 2
    assert {e.category for e in examples} == {"extract", "chat"}
    one = next(e for e in examples if e.prompt.startswith("Order 3 "))
    assert one.prompt == "Order 3 mugs, tel [REDACTED:phone]" and one.response == "reply to: Order 3 mugs, tel [REDACTED:phone]"
    assert one.messages[0].role == "system" and one.category == "extract"


ROUTE = {"type": "object", "properties": {"team": {"enum": ["billing", "sales"]}, "contact": {"type": "string"}},
         "required": ["team", "contact"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "route", "description": "Send to a team", "parameters": ROUTE}}]
ORDER = {"type": "json_schema", "json_schema": {"name": "order", "strict": True, "schema": {
    "type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"], "additionalProperties": False}}}
HISTORY = [
    {"role": "user", "content": "Route this: bob@example.com wants a refund"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_a", "type": "function", "function": {
        "name": "route", "arguments": '{"team": "sales", "contact": "bob@example.com"}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "sales says: not ours"},
    {"role": "user", "content": "Try again"},
]


def structured_service(request: dict):
    """Calls `route` when offered tools, else answers JSON; the reply carries what the request asked for."""
    from llamaduo.demo.faults import chat_completion

    body = chat_completion(request, '{"item": "mug"}')
    if request.get("tools"):
        body["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_b", "type": "function",
             "function": {"name": "route", "arguments": '{"team": "billing", "contact": "bob@example.com"}'}}]}
        body["choices"][0]["finish_reason"] = "tool_calls"
    return body


def load_captured(path, tmp_path):
    from llamaduo import structure
    from llamaduo.config import DataConfig
    from llamaduo.coverage import load_coverage

    return load_coverage(path, DataConfig(input=str(path)), check=structure.check).examples


def test_tools_calls_and_response_format_are_captured_redacted_and_load_as_coverage(tmp_path):
    out = tmp_path / "captured.jsonl"
    with SimulatedService(structured_service) as up, BackgroundServer(create_capture_app(up.base_url, out)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key=CANARY, max_retries=0)
        called = client.chat.completions.create(model="gpt-4o", messages=HISTORY, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=False)
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Order a mug"}],
                                       response_format=ORDER)
        sent = up.requests[0]["body"]
    assert called.choices[0].message.tool_calls[0].function.name == "route"
    assert "bob@example.com" in sent["messages"][0]["content"]  # forwarded unchanged
    calls, fmt = (json.loads(x) for x in out.read_text().splitlines())
    assert calls["tools"] == TOOLS and calls["tool_choice"] == "required" and calls["parallel_tool_calls"] is False
    assert calls["messages"][2] == {"role": "tool", "content": "sales says: not ours", "tool_call_id": "call_a"}
    target = calls["messages"][-1]
    assert target["tool_calls"][0]["id"] == "call_b"
    assert json.loads(target["tool_calls"][0]["function"]["arguments"]) == {"team": "billing",
                                                                           "contact": "[REDACTED:email]"}
    assert "bob@example.com" not in out.read_text()
    assert fmt["response_format"] == ORDER and fmt["messages"][-1] == {"role": "assistant", "content": '{"item": "mug"}'}
    ex_calls, ex_fmt = load_captured(out, tmp_path)  # validated against the tools and schema they carry
    assert ex_calls.tools == TOOLS and ex_calls.tool_choice == "required" and ex_calls.parallel_tool_calls is False
    assert [m.role for m in ex_calls.messages] == ["user", "assistant", "tool", "user", "assistant"]
    assert ex_calls.messages[-1].tool_calls[0].function.name == "route"
    assert ex_calls.request_fields() == {k: calls[k] for k in ("tools", "tool_choice", "parallel_tool_calls")}
    assert ex_fmt.response_format == ORDER and ex_fmt.response == '{"item": "mug"}'


def test_streamed_tool_calls_are_assembled_from_their_deltas(tmp_path):
    # The upstream is llamaduo's own server: it streams a call as a head delta, then argument fragments.
    answer = '<tool_call>\n{"name": "route", "arguments": {"team": "sales", "contact": "ann@example.org"}}\n</tool_call>'

    def gen(prompts, sampling, seed):
        return [type("Out", (), {"text": answer})() for _ in prompts]

    out = tmp_path / "captured.jsonl"
    upstream_app = create_app(gen, ServeConfig(), "student", defaults=InferConfig(max_new_tokens=8))
    with BackgroundServer(upstream_app) as up, BackgroundServer(create_capture_app(up.base_url, out)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key=CANARY, max_retries=0)
        chunks = list(client.chat.completions.create(model="student", messages=HISTORY, tools=TOOLS, stream=True))
    assert sum(bool(c.choices and c.choices[0].delta.tool_calls) for c in chunks) >= 2
    [rec] = lines(out)
    [call] = rec["messages"][-1]["tool_calls"]
    assert call["id"].startswith("call_") and call["function"]["name"] == "route"
    assert json.loads(call["function"]["arguments"]) == {"team": "sales", "contact": "[REDACTED:email]"}
    assert rec["tools"] == TOOLS
    [ex] = load_captured(out, tmp_path)
    assert ex.messages[-1].tool_calls[0].function.name == "route" and ex.tools == TOOLS
