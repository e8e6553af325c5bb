"""The two provider APIs: OpenAI-compatible chat completions and Anthropic's native Messages API.

Each turns (model, messages, params) into (text, input tokens, output tokens), says which
request parameters it sends, and turns its SDK's failures into `ServiceFault`s at the boundary
(`guard`). The client picks one provider object once, from `service.provider`. The SDKs are
imported only when a client connects, so importing the package stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from llamaduo.config import ServiceConfig
from llamaduo.service.parsing import strict_schema
from llamaduo.service.retry import ServiceFault, fault_from

T = TypeVar("T")


class Provider(Protocol):
    name: str
    no_batch_reason: str | None  # why `run_batch` is refused; None when the Batch API is wired

    def connect(self, api_key: str) -> Any: ...

    def params(self, temperature: float, max_tokens: int, schema: type[BaseModel] | None) -> dict[str, Any]: ...

    async def send(self, sdk: Any, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> tuple[str, int, int]: ...

    async def guard(self, call: Awaitable[T]) -> T: ...


async def _guard(call: Awaitable[T], sdk_errors: tuple[type[BaseException], ...]) -> T:
    """Await one SDK call; its SDK's, the transport's and body-decoding failures become faults."""
    import httpx

    try:
        return await call
    except json.JSONDecodeError as e:  # the provider's response body was not JSON
        raise fault_from(e) from e
    except (*sdk_errors, httpx.HTTPError, TimeoutError, ConnectionError) as e:
        raise fault_from(e) from e


class OpenAIProvider:
    """Any OpenAI-compatible endpoint (`/v1/chat/completions`), with the Batch API."""

    name = "openai"
    no_batch_reason = None

    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        # json_schema becomes json_object_schema once the server says it does not take json_schema
        self.schema_form = cfg.structured_output

    def connect(self, api_key: str) -> Any:
        import openai

        return openai.AsyncOpenAI(api_key=api_key, base_url=self.cfg.base_url, max_retries=0, timeout=self.cfg.timeout_s)

    def params(self, temperature: float, max_tokens: int, schema: type[BaseModel] | None) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens}
        if schema is not None and self.schema_form == "json_object":
            params["response_format"] = {"type": "json_object"}
        elif schema is not None and self.schema_form == "json_object_schema":
            params["response_format"] = {"type": "json_object", "schema": strict_schema(schema)}
        elif schema is not None and self.schema_form == "json_schema":
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": schema.__name__, "schema": strict_schema(schema), "strict": True},
            }
        return params

    async def send(self, sdk: Any, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> tuple[str, int, int]:
        fmt = params.get("response_format") or {}
        if fmt.get("type") == "json_schema" and self.schema_form == "json_object_schema":  # switched meanwhile
            params = {**params, "response_format": {"type": "json_object", "schema": fmt["json_schema"]["schema"]}}
        try:
            resp = await self.guard(sdk.chat.completions.create(model=model, messages=messages, **params))
        except ServiceFault as fault:
            if fmt.get("type") == "json_schema" and _rejects_json_schema(fault):
                self.schema_form = "json_object_schema"
                # Retryable: the retry sends the same schema as json_object + schema, which llama.cpp takes.
                raise ServiceFault("unsupported_format", f"{fault.message} [json_schema unsupported here: "
                                   "switching to json_object with a schema]", fault.http_status) from fault
            raise
        if not getattr(resp, "choices", None):
            raise ServiceFault("malformed", "Malformed: reply has no choices")
        text = resp.choices[0].message.content or ""
        usage = getattr(resp, "usage", None)
        return text, getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0

    async def guard(self, call: Awaitable[T]) -> T:
        import openai

        return await _guard(call, (openai.APIError,))


def _rejects_json_schema(fault: ServiceFault) -> bool:
    """The server refused the request because of response_format json_schema (400/422, or llama.cpp's 500)."""
    return fault.http_status in (400, 415, 422, 500, 501) and "json_schema" in fault.message


class AnthropicProvider:
    """Anthropic's Messages API (`/v1/messages`): system text travels apart from the turns."""

    name = "anthropic"
    no_batch_reason = "batch mode is available for OpenAI-compatible providers; Anthropic Message Batches are not wired yet"

    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg

    def connect(self, api_key: str) -> Any:
        import anthropic

        return anthropic.AsyncAnthropic(api_key=api_key, base_url=self.cfg.base_url, max_retries=0, timeout=self.cfg.timeout_s)

    def params(self, temperature: float, max_tokens: int, schema: type[BaseModel] | None) -> dict[str, Any]:
        # No response_format: JSON is asked for in the prompt. (These params are part of the cache key.)
        return {"temperature": temperature, "max_tokens": max_tokens}

    async def send(self, sdk: Any, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> tuple[str, int, int]:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
        rest = [m for m in messages if m["role"] != "system"]
        # temperature travels as a body field: SDK releases differ in the keywords they accept.
        kwargs: dict[str, Any] = {
            "model": model, "messages": rest, "max_tokens": params["max_tokens"],
            "extra_body": {"temperature": params["temperature"]},
        }
        if system:
            kwargs["system"] = system
        resp = await self.guard(sdk.messages.create(**kwargs))
        text = "".join(getattr(b, "text", "") for b in resp.content)
        return text, resp.usage.input_tokens, resp.usage.output_tokens

    async def guard(self, call: Awaitable[T]) -> T:
        import anthropic

        return await _guard(call, (anthropic.APIError,))


def make_provider(cfg: ServiceConfig) -> Provider:
    return AnthropicProvider(cfg) if cfg.provider == "anthropic" else OpenAIProvider(cfg)
