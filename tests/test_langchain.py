"""LangChain's `ChatOpenAI` against `llamaduo serve`: structured output and tool binding, unchanged code."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.tiny_server import structured, untrained  # noqa: F401

langchain_openai = pytest.importorskip("langchain_openai")


class Order(BaseModel):
    """An order taken from a customer message."""

    intent: Literal["order", "cancel", "return"]
    item: str
    quantity: int


class GetWeather(BaseModel):
    """The weather in a city now."""

    city: str = Field(description="the city")


def chat(srv) -> langchain_openai.ChatOpenAI:
    return langchain_openai.ChatOpenAI(base_url=srv.base_url, api_key="x", model="tiny-student", max_tokens=128,
                                       temperature=0, max_retries=0)


def test_with_structured_output_and_bind_tools_work_unchanged(untrained):  # noqa: F811
    ask = "Please send me two water bottles."
    with structured(untrained) as srv:
        by_schema = chat(srv).with_structured_output(Order).invoke(ask)  # response_format json_schema
        by_tool = chat(srv).with_structured_output(Order, method="function_calling").invoke(ask)  # a named tool
        called = chat(srv).bind_tools([GetWeather], tool_choice="required").invoke("Weather in Graz?")
    assert isinstance(by_schema, Order) and isinstance(by_tool, Order)
    assert called.tool_calls
    for call in called.tool_calls:
        assert call["name"] == "GetWeather" and isinstance(call["args"]["city"], str) and call["id"].startswith("call_")
