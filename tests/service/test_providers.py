"""What each provider puts on the wire: OpenAI response formats, Anthropic's system field."""

import json

from pydantic import BaseModel

from llamaduo.demo.simulator import Fault
from llamaduo.service import ServiceClient, strict_schema
from tests.conftest import service_config
from tests.service.conftest import GOOD, Verdict, ask, rows


def test_json_schema_mode_sends_a_strict_schema(fake_service, tmp_path):
    class Pair(BaseModel):
        instruction: str
        response: str = ""

    class Pairs(BaseModel):
        contents: list[Pair]

    fake_service.responder = lambda req: json.dumps({"contents": [{"instruction": "a", "response": "b"}]})
    client = ServiceClient(service_config(fake_service, structured_output="json_schema"), db_path=tmp_path / "s.sqlite")
    [reply] = client.run([client.chat_json([{"role": "user", "content": "x"}], Pairs)])
    fmt = fake_service.requests[0]["body"]["response_format"]
    assert reply.ok and fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == strict_schema(Pairs)
    pair = strict_schema(Pairs)["$defs"]["Pair"]
    assert pair["additionalProperties"] is False and pair["required"] == ["instruction", "response"]


def test_json_object_mode_asks_for_a_json_object(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    client = ServiceClient(service_config(fake_service, structured_output="json_object"), db_path=tmp_path / "s.sqlite")
    ask(client)
    assert fake_service.requests[0]["body"]["response_format"] == {"type": "json_object"}


def test_anthropic_provider_sends_system_separately_and_shares_the_call_log(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    fake_service.inject(Fault.server_error(529))
    cfg = service_config(fake_service, provider="anthropic", base_url=fake_service.base_url.removesuffix("/v1"))
    client = ServiceClient(cfg, db_path=tmp_path / "s.sqlite")
    msgs = [{"role": "system", "content": "You are a judge."}, {"role": "user", "content": "judge this"}]
    [reply] = client.run([client.chat_json(msgs, Verdict, stage="judge")])
    body = fake_service.requests[-1]["body"]
    assert fake_service.requests[-1]["path"] == "/v1/messages"
    assert reply.ok and reply.parsed.score == 7 and reply.cost_usd > 0
    assert body["system"] == "You are a judge." and [m["role"] for m in body["messages"]] == ["user"]
    assert [r[0] for r in rows(tmp_path / "s.sqlite")] == ["http_529", "ok"]


# ---- Anthropic: OpenAI's tools, tool turns and response formats in the Messages API's shapes
ROUTE = {"type": "object", "properties": {"team": {"enum": ["billing", "sales"]}}, "required": ["team"]}
TOOLS = [{"type": "function", "function": {"name": "route", "description": "Pick a team", "parameters": ROUTE}},
         {"type": "function", "function": {"name": "ping"}}]
ASK = [{"role": "system", "content": "You route."}, {"role": "user", "content": "Route my refund"}]


def anthropic_client(svc, tmp_path):
    cfg = service_config(svc, provider="anthropic", base_url=svc.base_url.removesuffix("/v1"))
    return ServiceClient(cfg, db_path=tmp_path / "s.sqlite")


def test_anthropic_tools_and_tool_choice_reach_the_server_in_anthropic_shape(fake_service, tmp_path):
    fake_service.responder = lambda req: "no call"
    client = anthropic_client(fake_service, tmp_path)
    choices = ["required", {"type": "function", "function": {"name": "route"}}, "none", "auto"]
    replies = client.run([client.chat_text(ASK, request_fields={"tools": TOOLS, "tool_choice": c, "parallel_tool_calls": False})
                          for c in choices])
    sent = [r["body"] for r in fake_service.requests]
    assert all(r.ok and r.raw == "no call" for r in replies) and len(sent) == 4  # distinct cache keys: none cached
    by_choice = {json.dumps(b["tool_choice"], sort_keys=True) for b in sent}
    assert by_choice == {json.dumps(c, sort_keys=True) for c in [
        {"type": "any", "disable_parallel_tool_use": True}, {"type": "tool", "name": "route", "disable_parallel_tool_use": True},
        {"type": "none"}, {"type": "auto", "disable_parallel_tool_use": True}]}
    assert sent[0]["tools"] == [{"name": "route", "description": "Pick a team", "input_schema": ROUTE},
                                {"name": "ping", "input_schema": {"type": "object", "properties": {}}}]
    assert sent[0]["system"] == "You route." and sent[0]["messages"] == [{"role": "user", "content": "Route my refund"}]
    [again] = client.run([client.chat_text(ASK, request_fields={"tools": TOOLS, "tool_choice": "none", "parallel_tool_calls": False})])
    plain = client.run([client.chat_text(ASK)])[0]
    assert again.cached and not plain.cached and len(fake_service.requests) == 5  # plain is another request


def test_anthropic_tool_history_becomes_tool_use_and_merged_tool_result_turns(fake_service, tmp_path):
    fake_service.responder = lambda req: "done"
    history = [*ASK, {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "route", "arguments": '{"team": "sales"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "ping", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "not ours"},
        {"role": "tool", "tool_call_id": "call_b", "content": "pong"},
        {"role": "user", "content": "Try again"}]
    client = anthropic_client(fake_service, tmp_path)
    [reply] = client.run([client.chat_text(history, request_fields={"tools": TOOLS})])
    turns = fake_service.requests[0]["body"]["messages"]
    assert reply.ok and [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_a", "name": "route", "input": {"team": "sales"}},
        {"type": "tool_use", "id": "call_b", "name": "ping", "input": {}}]
    assert turns[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_a", "content": "not ours"},
        {"type": "tool_result", "tool_use_id": "call_b", "content": "pong"}, {"type": "text", "text": "Try again"}]


def test_an_anthropic_tool_use_reply_comes_back_as_tool_call_blocks(fake_service, tmp_path):
    from llamaduo.data import TOOL_CALL_SEPARATOR, tool_call_text
    from llamaduo.demo.faults import anthropic_message

    fake_service.responder = lambda req: anthropic_message(req, [
        {"type": "text", "text": "Routing."},
        {"type": "tool_use", "id": "toolu_1", "name": "route", "input": {"team": "billing"}}])
    client = anthropic_client(fake_service, tmp_path)
    [reply] = client.run([client.chat_text(ASK, request_fields={"tools": TOOLS, "tool_choice": "auto"})])
    assert reply.ok and reply.raw == TOOL_CALL_SEPARATOR.join(["Routing.", tool_call_text("route", '{"team": "billing"}')])


def test_an_anthropic_json_schema_request_answers_through_a_forced_tool_as_json_content(fake_service, tmp_path):
    from llamaduo.demo.faults import anthropic_message

    order = {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "strict": True, "schema": order}}
    fake_service.responder = lambda req: anthropic_message(req, [
        {"type": "tool_use", "id": "toolu_1", "name": req["tool_choice"].get("name", "route"), "input": {"item": "mug"}}])
    client = anthropic_client(fake_service, tmp_path)
    as_json, as_object, beside_tools = client.run([
        client.chat_text(ASK, request_fields={"response_format": fmt}),
        client.chat_text(ASK, request_fields={"response_format": {"type": "json_object"}}),
        client.chat_text(ASK, request_fields={"response_format": fmt, "tools": TOOLS[:1]})])
    # sent concurrently: told apart by the tools they carry, not by arrival order
    by_tools = {tuple(t["name"] for t in r["body"]["tools"]): r["body"] for r in fake_service.requests}
    schema_req, object_req, tools_req = by_tools[("order",)], by_tools[("json_object",)], by_tools[("route", "order")]
    assert json.loads(as_json.raw) == {"item": "mug"} and json.loads(as_object.raw) == {"item": "mug"}
    assert schema_req["tools"] == [{"name": "order", "description": "Give your whole answer as this tool's input.",
                                    "input_schema": order, "strict": True}]
    assert schema_req["tool_choice"] == {"type": "tool", "name": "order", "disable_parallel_tool_use": True}
    assert object_req["tools"][0]["input_schema"] == {"type": "object"}
    # Beside a tool it may call, the model must call one of them: the tool, or the answer's.
    assert [t["name"] for t in tools_req["tools"]] == ["route", "order"] and tools_req["tool_choice"] == {"type": "any"}
    assert beside_tools.raw.startswith("<tool_call>")


def test_what_anthropic_cannot_carry_is_refused_naming_the_field():
    import pytest

    from llamaduo.config import ServiceConfig
    from llamaduo.service import UnsupportedField
    from llamaduo.service.providers import AnthropicProvider

    provider = AnthropicProvider(ServiceConfig(provider="anthropic"))
    cases = {
        "tools[0]": {"tools": [{"type": "web_search"}]},
        "response_format.json_schema.schema": {"response_format": {"type": "json_schema", "json_schema": {
            "name": "xs", "schema": {"type": "array"}}}},
        "tool_choice": {"tool_choice": "required"},
        "logit_bias": {"logit_bias": {"1": 2}},
    }
    for field, fields in cases.items():
        with pytest.raises(UnsupportedField) as e:
            provider.request_fields(fields)
        assert e.value.field == field and field in str(e.value)
    assert provider.request_fields({"response_format": {"type": "text"}}) == {}
