"""Function calling through `llamaduo serve`: tools in the prompt, calls parsed out, forced calls enforced."""

from __future__ import annotations

import asyncio
import copy
import json

import jsonschema
import openai

from llamaduo.tools import parse_tool_calls, render_conversation
from tests.tiny_server import structured, untrained  # noqa: F401

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
PARAMS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "What is the weather in Graz?"}]


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)


def assert_valid_calls(choice, names: set[str]) -> None:
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_required_and_named_tool_choice_always_produce_a_valid_call_and_none_produces_none(untrained):  # noqa: F811
    with structured(untrained) as srv:
        c = client(srv)
        required = c.chat.completions.create(model="tiny-student", messages=ASK, tools=TOOLS, tool_choice="required",
                                             max_tokens=160, temperature=1.0, n=3, seed=1)
        named = c.chat.completions.create(
            model="tiny-student", messages=ASK, tools=TOOLS, max_tokens=160,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
        single = c.chat.completions.create(model="tiny-student", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=160)
        none = c.chat.completions.create(model="tiny-student", messages=ASK, tools=TOOLS, tool_choice="none",
                                         max_tokens=24)
    for choice in required.choices:
        assert_valid_calls(choice, set(PARAMS))
    assert_valid_calls(named.choices[0], {"get_time"})
    assert len(named.choices[0].message.tool_calls) == 1 and len(single.choices[0].message.tool_calls) == 1
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"
    assert none.choices[0].message.content


def test_streamed_tool_calls_arrive_as_openai_deltas(untrained):  # noqa: F811
    async def ask(srv) -> list:
        c = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        stream = await c.chat.completions.create(model="tiny-student", messages=ASK, tools=TOOLS, stream=True,
                                                 tool_choice="required", parallel_tool_calls=False, max_tokens=160)
        chunks = [ch async for ch in stream]
        await c.close()
        return chunks

    with structured(untrained) as srv:
        chunks = asyncio.run(ask(srv))
        # The SDK's own accumulator rebuilds the message from the same deltas.
        with client(srv).chat.completions.stream(model="tiny-student", messages=ASK, tools=TOOLS,
                                                 tool_choice="required", max_tokens=160) as s:
            final = s.get_final_completion()
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    first = deltas[0]
    assert first.index == 0 and first.id.startswith("call_") and first.function.name in PARAMS
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), PARAMS[first.function.name])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    assert_valid_calls(final.choices[0], set(PARAMS))


def test_tool_results_and_assistant_calls_are_accepted_in_the_history(untrained):  # noqa: F811
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                               "arguments": '{"city": "Graz", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    with structured(untrained) as srv:
        r = client(srv).chat.completions.create(model="tiny-student", messages=history, tools=TOOLS, max_tokens=8)
        forced = client(srv).chat.completions.create(model="tiny-student", messages=history, tools=TOOLS,
                                                     tool_choice="required", max_tokens=160)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert_valid_calls(forced.choices[0], set(PARAMS))


def test_a_template_without_tools_gets_them_in_the_documented_system_turn(untrained):  # noqa: F811
    _, tok = untrained
    history = [
        {"role": "system", "content": "Be brief."}, *ASK,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    text = render_conversation(tok, history, TOOLS)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and json.dumps(TOOLS[0]) in system
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_template_that_renders_tools_gets_them_through_the_template(untrained):  # noqa: F811
    tok = copy.deepcopy(untrained[1])
    tok.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.tz }}{% endfor %}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]}]
    text = render_conversation(tok, history, TOOLS)
    assert text.startswith("TOOLS:get_weather;get_time;") and "CALL get_time CET" in text  # arguments as an object
    assert "<tools>" not in text and text.endswith("assistant:")


def test_tool_calls_are_parsed_from_blocks_and_bare_json_and_unknown_functions_stay_text():
    text = ('Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>')
    content, calls = parse_tool_calls(text, {"get_time"})
    assert [c["function"]["name"] for c in calls] == ["get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"tz": "UTC"}
    assert content.startswith("Checking.") and "launch" in content
    bare, [call] = parse_tool_calls('{"name": "get_time", "parameters": {"tz": "CET"}}', {"get_time"})
    assert bare is None and json.loads(call["function"]["arguments"]) == {"tz": "CET"}
    assert parse_tool_calls("<tool_call>\n{\"name\": \"get_time\", \"argu", {"get_time"}) == (
        '<tool_call>\n{"name": "get_time", "argu', [])


def test_streamed_calls_from_the_continuous_batch_send_arguments_as_they_are_decoded(untrained):  # noqa: F811
    from llamaduo.config import ServeConfig
    from llamaduo.scheduler import Scheduler
    from llamaduo.serve import BackgroundServer, create_app
    from tests.tiny_server import DEFAULTS

    model, tok = untrained
    # No coalescing: what is decoded goes out at once, so the fragments show however fast this machine is.
    app = create_app(Scheduler(model, tok, 8, handover_gap_s=0.0), ServeConfig(max_batch=8), "tiny-student",
                     defaults=DEFAULTS, tokenizer=tok)
    ask = dict(model="tiny-student", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=160,
               temperature=0.0, seed=3)
    with BackgroundServer(app, model_name="tiny-student") as srv:
        whole = client(srv).chat.completions.create(**ask)
        chunks = list(client(srv).chat.completions.create(**ask, stream=True))
        with client(srv).chat.completions.stream(**ask) as s:  # the SDK's accumulator over the same deltas
            final = s.get_final_completion()
    assert_valid_calls(whole.choices[0], set(PARAMS))
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    first = deltas[0]
    assert first.id.startswith("call_") and first.type == "function" and first.function.arguments == ""
    fragments = [d.function.arguments for d in deltas if d.id is None]
    assert len(fragments) > 3  # the arguments stream in pieces, not as one string at the end
    want = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    streamed: dict[int, list[str]] = {}
    for d in deltas:
        streamed.setdefault(d.index, ["", ""])
        streamed[d.index][0] = d.function.name or streamed[d.index][0]
        streamed[d.index][1] += d.function.arguments or ""
    assert [tuple(v) for _, v in sorted(streamed.items())] == want
    assert [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls] == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    assert final.choices[0].finish_reason == "tool_calls"
