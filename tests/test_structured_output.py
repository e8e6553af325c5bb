"""`response_format` through `llamaduo serve`: JSON that always fits its schema, from the openai client.

The model is the tiny one as initialised, never trained: without the grammar it writes noise,
so every valid answer here is the grammar's doing, and the budget rule (`grammar.py`) is what
closes its endless strings before `max_tokens`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from llamaduo.config import ServeConfig
from llamaduo.serve import BackgroundServer, create_app
from tests.tiny_server import structured, untrained  # noqa: F401

ORDER = {
    "type": "object",
    "properties": {
        "intent": {"type": "string", "enum": ["order", "cancel", "return"]},
        "name": {"type": "string"},
        "quantity": {"type": "integer"},
        "gift": {"type": "boolean"},
        "items": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                    "additionalProperties": False},
    },
    "required": ["intent", "name", "quantity", "gift", "items", "address"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Hi, I'm Lukas from Graz. Please send me two water bottles."}]


def strict_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "order", "schema": schema, "strict": True}}


class Order(BaseModel):
    intent: Literal["order", "cancel", "return"]
    name: str
    quantity: int


def client(srv: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)


def test_strict_json_schema_answers_always_validate_even_from_an_untrained_model(untrained):  # noqa: F811
    with structured(untrained) as srv:
        greedy = client(srv).chat.completions.create(
            model="tiny-student", messages=ASK, max_tokens=160, response_format=strict_format(ORDER)
        )
        sampled = client(srv).chat.completions.create(
            model="tiny-student", messages=ASK, max_tokens=160, temperature=1.0, n=3, seed=5,
            response_format=strict_format(ORDER),
        )
    choices = greedy.choices + sampled.choices
    for c in choices:
        jsonschema.validate(json.loads(c.message.content), ORDER)
        assert c.finish_reason == "stop"
    assert len({c.message.content for c in sampled.choices}) > 1  # each sample has its own grammar state


def test_parse_with_a_pydantic_model_returns_the_parsed_object(untrained):  # noqa: F811
    with structured(untrained) as srv:
        r = client(srv).chat.completions.parse(model="tiny-student", messages=ASK, max_tokens=96, response_format=Order)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Order) and parsed.intent in ("order", "cancel", "return")


def test_async_and_streamed_json_answers_are_valid(untrained):  # noqa: F811
    async def ask(srv: BackgroundServer) -> tuple[str, str]:
        c = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        stream = await c.chat.completions.create(
            model="tiny-student", messages=ASK, max_tokens=160, stream=True, response_format=strict_format(ORDER)
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        obj = await c.chat.completions.create(
            model="tiny-student", messages=ASK, max_tokens=48, response_format={"type": "json_object"}
        )
        await c.close()
        return text, obj.choices[0].message.content

    with structured(untrained) as srv:
        streamed, any_object = asyncio.run(ask(srv))
    jsonschema.validate(json.loads(streamed), ORDER)
    assert isinstance(json.loads(any_object), dict)


def test_a_budget_too_small_for_the_schema_ends_with_length_not_a_false_stop(untrained):  # noqa: F811
    with structured(untrained) as srv:
        r = client(srv).chat.completions.create(
            model="tiny-student", messages=ASK, max_tokens=4, response_format=strict_format(ORDER)
        )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def test_an_invalid_or_unsupported_schema_is_a_400_naming_the_field(untrained):  # noqa: F811
    with structured(untrained) as srv:
        url = srv.base_url + "/chat/completions"

        def post(**fields) -> httpx.Response:
            return httpx.post(url, json={"model": "tiny-student", "messages": ASK, **fields})

        bad_type = post(response_format=strict_format({"type": "objekt"}))
        dangling = post(response_format=strict_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}}))
        no_schema = post(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
        kind = post(response_format={"type": "grammar"})
        tool_params = post(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}])
        too_many = post(logprobs=True, top_logprobs=21)
        bias = post(logit_bias={"5": 10})
        with pytest.raises(openai.BadRequestError) as via_client:
            client(srv).chat.completions.create(model="tiny-student", messages=ASK,
                                                response_format=strict_format({"type": "objekt"}))
    assert via_client.value.body["param"] == "response_format.json_schema.schema"
    expected = {
        bad_type: "response_format.json_schema.schema", dangling: "response_format.json_schema.schema",
        no_schema: "response_format.json_schema.schema", kind: "response_format.type",
        tool_params: "tools[0].function.parameters", too_many: "top_logprobs", bias: "logit_bias",
    }
    for r, param in expected.items():
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_unknown_model_is_404_model_not_found_and_models_can_be_retrieved(untrained):  # noqa: F811
    with structured(untrained) as srv:
        with pytest.raises(openai.NotFoundError) as chat:
            client(srv).chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=2)
        card = client(srv).models.retrieve("tiny-student")
        with pytest.raises(openai.NotFoundError) as retrieve:
            client(srv).models.retrieve("gpt-4o")
    assert chat.value.body["code"] == "model_not_found" and "gpt-4o" in chat.value.body["message"]
    assert set(chat.value.body) == {"message", "type", "param", "code"}
    assert card.id == "tiny-student" and card.object == "model"
    assert retrieve.value.status_code == 404 and retrieve.value.body["code"] == "model_not_found"


def test_max_completion_tokens_is_an_alias_and_unknown_fields_are_tolerated(untrained):  # noqa: F811
    with structured(untrained) as srv:
        r = client(srv).chat.completions.create(
            model="tiny-student", messages=ASK, max_completion_tokens=3, extra_body={"a_future_field": {"x": 1}}
        )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_a_server_that_cannot_constrain_refuses_rather_than_ignores():
    def plain(prompts, sampling, seed):  # a generator without a tokenizer: no grammar engine
        return [type("Out", (), {"text": "not json"})() for _ in prompts]

    with BackgroundServer(create_app(plain, ServeConfig(), "tiny-student")) as srv:
        with pytest.raises(openai.BadRequestError) as json_mode:
            client(srv).chat.completions.create(model="tiny-student", messages=ASK,
                                                response_format={"type": "json_object"})
        with pytest.raises(openai.BadRequestError) as logprobs:
            client(srv).chat.completions.create(model="tiny-student", messages=ASK, logprobs=True)
        text = client(srv).chat.completions.create(model="tiny-student", messages=ASK,
                                                   response_format={"type": "text"})
    assert json_mode.value.body["param"] == "response_format"
    assert logprobs.value.body["param"] == "logprobs"
    assert text.choices[0].message.content == "not json"
