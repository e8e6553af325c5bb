"""The fallback path: the service LLM answers when local generation fails or is too slow."""

from __future__ import annotations

import json
import threading
import time

import httpx

from llamaduo.config import ServeConfig
from llamaduo.demo.simulator import SimulatedService
from llamaduo.service import ServiceClient
from tests.conftest import service_config
from tests.tiny_server import client, direct, gen, running, tiny, untrained  # noqa: F401


def test_fallback_answers_from_the_service_when_local_generation_fails(gen, tmp_path):  # noqa: F811
    def broken(prompts, sampling, seed):
        raise RuntimeError("model crashed")

    with SimulatedService(lambda req: "service says: " + req["messages"][-1]["content"]) as svc:
        service = ServiceClient(service_config(svc), db_path=tmp_path / "service.sqlite")
        with running(broken, ServeConfig(fallback=True), fallback_client=service) as srv:
            raw = client(srv).chat.completions.with_raw_response.create(
                model="tiny-student", messages=[{"role": "user", "content": "Order 2 lamps"}], max_tokens=8
            )
            stream = list(client(srv).chat.completions.create(
                model="tiny-student", messages=[{"role": "user", "content": "Order 3 lamps"}], stream=True
            ))
            health = httpx.get(srv.base_url.removesuffix("/v1") + "/health").json()
        ledger = service.ledger()
        service.close()
    r = raw.parse()
    assert raw.headers["x-llamaduo-served-by"] == "service"
    assert r.choices[0].message.content == "service says: Order 2 lamps" and r.model == "fake-model"
    assert r.model_extra["llamaduo_fallback"] is True
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "service says: Order 3 lamps"
    assert all(c.model_extra["llamaduo_fallback"] for c in stream)
    assert svc.requests[0]["body"]["messages"] == [{"role": "user", "content": "Order 2 lamps"}]
    assert health["fallbacks"] == 2 and ledger["total"]["calls"] == 2


def test_fallback_takes_over_when_local_generation_is_over_the_latency_budget(tiny, gen, tmp_path):  # noqa: F811
    release = threading.Event()

    def slow(prompts, sampling, seed):
        release.wait(5)
        return gen(prompts, sampling, seed)

    with SimulatedService(lambda req: "fast service answer") as svc:
        service = ServiceClient(service_config(svc), db_path=None)
        cfg = ServeConfig(fallback=True, latency_budget_s=0.3)
        with running(slow, cfg, fallback_client=service) as srv:
            t0 = time.monotonic()
            raw = client(srv).chat.completions.with_raw_response.create(
                model="tiny-student", messages=[{"role": "user", "content": "Hi"}]
            )
            waited = time.monotonic() - t0
            release.set()
            time.sleep(0.05)
            after = client(srv).chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "Hi"}])
        service.close()
    assert raw.headers["x-llamaduo-served-by"] == "service" and raw.parse().choices[0].message.content == "fast service answer"
    assert waited < 3
    assert after.choices[0].message.content == direct(tiny, "Hi") != ""  # local again once it is fast


def test_when_local_and_service_both_fail_the_answer_is_a_502(tmp_path):
    from llamaduo.demo.simulator import Fault

    def broken(prompts, sampling, seed):
        raise RuntimeError("model crashed")

    with SimulatedService(lambda req: "unused") as svc:
        svc.inject(*[Fault.server_error(503)] * 3)
        service = ServiceClient(service_config(svc, max_retries=2), db_path=None)
        with running(broken, ServeConfig(fallback=True), fallback_client=service) as srv:
            r = httpx.post(srv.base_url + "/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        service.close()
    err = r.json()["error"]
    assert r.status_code == 502 and err["code"] == "fallback_failed" and "model crashed" in err["message"]


ROUTE = {"type": "object", "properties": {"team": {"enum": ["billing", "sales"]}}, "required": ["team"],
         "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "route", "parameters": ROUTE}}]
ORDER = {"type": "json_schema", "json_schema": {"name": "order", "strict": True, "schema": {
    "type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"], "additionalProperties": False}}}
HISTORY = [
    {"role": "user", "content": "Route my refund"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "route", "arguments": '{"team": "sales"}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "not ours"},
]


def structured_service(request: dict):
    """A service that calls `route` when it is offered tools and answers JSON otherwise."""
    from llamaduo.demo.faults import chat_completion

    body = chat_completion(request, '{"item": "mug"}')
    if request.get("tools"):
        body["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_s", "type": "function", "function": {"name": "route", "arguments": '{"team": "billing"}'}}]}
        body["choices"][0]["finish_reason"] = "tool_calls"
    return body


def broken(prompts, sampling, seed):
    raise RuntimeError("model crashed")


def test_a_structured_request_falls_back_with_its_tools_and_schema_and_gets_calls_back(tmp_path, untrained):  # noqa: F811
    with SimulatedService(structured_service) as svc:
        service = ServiceClient(service_config(svc), db_path=tmp_path / "service.sqlite")
        with running(broken, ServeConfig(fallback=True), fallback_client=service, tokenizer=untrained[1]) as srv:
            c = client(srv)
            called = c.chat.completions.create(model="tiny-student", messages=HISTORY, tools=TOOLS,
                                               tool_choice="required", parallel_tool_calls=False)
            with c.chat.completions.stream(model="tiny-student", messages=HISTORY, tools=TOOLS, tool_choice="auto",
                                           temperature=0.5) as s:
                streamed = s.get_final_completion()
            as_json = c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "A mug"}],
                                                response_format=ORDER)
        service.close()
    for r in (called, streamed):
        [call] = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "route"
        assert json.loads(call.function.arguments) == {"team": "billing"} and call.id.startswith("call_")
    assert as_json.choices[0].message.content == '{"item": "mug"}' and as_json.model_extra["llamaduo_fallback"]
    sent = svc.requests[0]["body"]
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False
    assert sent["messages"][1]["tool_calls"][0]["id"] == "call_a" and sent["messages"][2]["role"] == "tool"
    assert svc.requests[2]["body"]["response_format"] == ORDER


def test_a_service_answer_that_breaks_the_requests_structure_is_a_502_not_a_200(tmp_path, untrained):  # noqa: F811
    from llamaduo.demo.faults import chat_completion

    with SimulatedService(lambda req: chat_completion(req, "Sure! One mug coming up.")) as svc:
        service = ServiceClient(service_config(svc), db_path=tmp_path / "service.sqlite")
        with running(broken, ServeConfig(fallback=True), fallback_client=service, tokenizer=untrained[1]) as srv:
            url = srv.base_url + "/chat/completions"
            schema = httpx.post(url, json={"messages": [{"role": "user", "content": "A mug"}], "response_format": ORDER})
            call = httpx.post(url, json={"messages": HISTORY, "tools": TOOLS, "tool_choice": "required"})
            plain = httpx.post(url, json={"messages": [{"role": "user", "content": "A mug"}]})
        service.close()
    for r, field in ((schema, "response_format"), (call, "tools")):
        err = r.json()["error"]
        assert r.status_code == 502 and err["code"] == "fallback_invalid" and err["param"] == field, r.text
        assert "local model failed" in err["message"] and "does not fit the request" in err["message"]
    assert "not JSON" in schema.json()["error"]["message"] and "route" in call.json()["error"]["message"]
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"] == "Sure! One mug coming up."


def anthropic_service(request: dict):
    """Claude through the Messages API: calls `route` when offered it, answers a schema through its tool."""
    from llamaduo.demo.faults import anthropic_message

    tools = {t["name"] for t in request.get("tools", [])}
    if "route" in tools:
        return anthropic_message(request, [{"type": "tool_use", "id": "toolu_1", "name": "route", "input": {"team": "billing"}}])
    if tools:
        return anthropic_message(request, [{"type": "tool_use", "id": "toolu_2", "name": request["tool_choice"]["name"],
                                            "input": {"item": "mug"}}])
    return "plain words"


def test_an_anthropic_fallback_answers_tools_and_schemas_through_the_messages_api(tmp_path, untrained):  # noqa: F811
    import openai
    import pytest

    with SimulatedService(anthropic_service) as svc:
        cfg = service_config(svc, provider="anthropic", base_url=svc.base_url.removesuffix("/v1"))
        service = ServiceClient(cfg, db_path=tmp_path / "service.sqlite")
        with running(broken, ServeConfig(fallback=True), fallback_client=service, tokenizer=untrained[1]) as srv:
            c = client(srv)
            called = c.chat.completions.create(model="tiny-student", messages=HISTORY, tools=TOOLS,
                                               tool_choice="required", parallel_tool_calls=False)
            with c.chat.completions.stream(model="tiny-student", messages=HISTORY, tools=TOOLS, tool_choice="auto") as s:
                streamed = s.get_final_completion()
            as_json = c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "A mug"}],
                                                response_format=ORDER)
            plain = c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "Hi"}])
            lists = {"type": "json_schema", "json_schema": {"name": "items", "schema": {"type": "array"}}}
            with pytest.raises(openai.APIStatusError) as refused:  # a tool's input is always an object
                c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "Mugs"}],
                                          response_format=lists)
        service.close()
    for r in (called, streamed):
        [call] = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "route"
        assert json.loads(call.function.arguments) == {"team": "billing"} and r.model_extra["llamaduo_fallback"]
    assert json.loads(as_json.choices[0].message.content) == {"item": "mug"} and not as_json.choices[0].message.tool_calls
    assert plain.choices[0].message.content == "plain words"
    sent = svc.requests[0]["body"]
    assert svc.requests[0]["path"] == "/v1/messages" and sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert sent["tools"] == [{"name": "route", "input_schema": ROUTE}]
    assert [t["role"] for t in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == [{"type": "tool_use", "id": "call_a", "name": "route", "input": {"team": "sales"}}]
    assert sent["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "call_a", "content": "not ours"}]
    assert svc.requests[2]["body"]["tool_choice"] == {"type": "tool", "name": "order", "disable_parallel_tool_use": True}
    assert refused.value.status_code == 502 and refused.value.body["code"] == "fallback_unsupported"
    assert refused.value.body["param"] == "response_format.json_schema.schema" and "object schema" in refused.value.message
    assert svc.count == 4  # the refused request was not sent
