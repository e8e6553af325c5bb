"""The two provider APIs: OpenAI-compatible chat completions and Anthropic's native Messages API.

Each turns (model, messages, params) into (text, input tokens, output tokens), says which
request parameters it sends, and turns its failures into `ServiceFault`s at the boundary
(`guard` for SDK calls). The client picks one provider object once, from `service.provider`.
OpenAI-compatible chat calls go through `transport` (plain JSON POSTs, see there why); the SDKs
are imported only when they are used, so importing the package stays cheap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from llamaduo.config import ServiceConfig
from llamaduo.data import TOOL_CALL_SEPARATOR, tool_call_text
from llamaduo.service import anthropic_tools
from llamaduo.service.parsing import strict_schema
from llamaduo.service.retry import ServiceFault, fault_from
from llamaduo.service.transport import DEFAULT_BASE_URL, connect, openai_headers

T = TypeVar("T")


class Provider(Protocol):
    name: str
    no_batch_reason: str | None  # why `run_batch` is refused; None when the Batch API is wired

    def request_fields(self, fields: dict[str, Any]) -> dict[str, Any]: ...

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


class OpenAIConnection:
    """Chat calls over `transport` (see there why); the openai SDK, for the Batch API, made on first use."""

    def __init__(self, cfg: ServiceConfig, api_key: str):
        self.cfg = cfg
        self._api_key = api_key
        base = cfg.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        self.http = connect(base, openai_headers(api_key), cfg.timeout_s, connections=cfg.concurrency)
        self._sdk: Any = None

    @property
    def sdk(self) -> Any:
        if self._sdk is None:
            import openai

            self._sdk = openai.AsyncOpenAI(
                api_key=self._api_key, base_url=self.cfg.base_url, max_retries=0, timeout=self.cfg.timeout_s
            )
        return self._sdk

    async def close(self) -> None:
        await self.http.aclose()
        if self._sdk is not None:
            await self._sdk.close()


class OpenAIProvider:
    """Any OpenAI-compatible endpoint (`/v1/chat/completions`), with the Batch API."""

    name = "openai"
    no_batch_reason = None

    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        # json_schema becomes json_object_schema once the server says it does not take json_schema
        self.schema_form = cfg.structured_output

    def connect(self, api_key: str) -> OpenAIConnection:
        return OpenAIConnection(self.cfg, api_key)

    def request_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        """An application's structured-output fields (tools, tool_choice, parallel_tool_calls,
        response_format): sent as they are; the reply's calls come back as `<tool_call>` blocks."""
        return dict(fields)

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

    async def send(
        self, conn: OpenAIConnection, model: str, messages: list[dict[str, str]], params: dict[str, Any]
    ) -> tuple[str, int, int]:
        fmt = params.get("response_format") or {}
        if fmt.get("type") == "json_schema" and self.schema_form == "json_object_schema":  # switched meanwhile
            params = {**params, "response_format": {"type": "json_object", "schema": fmt["json_schema"]["schema"]}}
        try:
            body = await conn.http.post_json("/chat/completions", {"model": model, "messages": messages, **params})
        except ServiceFault as fault:
            if fmt.get("type") == "json_schema" and _rejects_json_schema(fault):
                self.schema_form = "json_object_schema"
                # Retryable: the retry sends the same schema as json_object + schema, which llama.cpp takes.
                raise ServiceFault("unsupported_format", f"{fault.message} [json_schema unsupported here: "
                                   "switching to json_object with a schema]", fault.http_status) from fault
            raise
        try:
            message = body["choices"][0]["message"]
            usage = body.get("usage") or {}
            return _reply_text(message), int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:  # JSON, but not a chat completion
            raise ServiceFault("malformed", f"Malformed: reply has no choices ({type(e).__name__})") from e

    async def guard(self, call: Awaitable[T]) -> T:
        import openai

        return await _guard(call, (openai.APIError,))


def _reply_text(message: dict[str, Any]) -> str:
    """The reply as text: its content, then each tool call as a `<tool_call>` block (the one text
    form of a call, `data.Message.text`), so the call log and cache keep calls as text too."""
    text = message.get("content") or ""
    calls = [tool_call_text(c["function"]["name"], c["function"].get("arguments") or "{}")
             for c in message.get("tool_calls") or []]
    return TOOL_CALL_SEPARATOR.join([text, *calls] if text else calls)


def _rejects_json_schema(fault: ServiceFault) -> bool:
    """The server refused the request because of response_format json_schema (400/422, or llama.cpp's 500)."""
    return fault.http_status in (400, 415, 422, 500, 501) and "json_schema" in fault.message


class AnthropicProvider:
    """Anthropic's Messages API (`/v1/messages`): system text travels apart from the turns; OpenAI's
    tools, tool turns and response formats in Anthropic's shapes (`anthropic_tools`)."""

    name = "anthropic"
    no_batch_reason = "batch mode is available for OpenAI-compatible providers; Anthropic Message Batches are not wired yet"

    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg

    def connect(self, api_key: str) -> Any:
        import anthropic

        return anthropic.AsyncAnthropic(api_key=api_key, base_url=self.cfg.base_url, max_retries=0, timeout=self.cfg.timeout_s)

    def request_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        """An application's structured-output fields as the Messages API's tools and tool_choice
        (`anthropic_tools`); raises `UnsupportedField` naming one that has no equivalent."""
        return anthropic_tools.request_params(fields)

    def params(self, temperature: float, max_tokens: int, schema: type[BaseModel] | None) -> dict[str, Any]:
        # No response_format: JSON is asked for in the prompt. (These params are part of the cache key.)
        return {"temperature": temperature, "max_tokens": max_tokens}

    async def send(self, sdk: Any, model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> tuple[str, int, int]:
        system, turns = anthropic_tools.turns(messages)
        # temperature travels as a body field: SDK releases differ in the keywords they accept.
        kwargs: dict[str, Any] = {
            "model": model, "messages": turns, "max_tokens": params["max_tokens"],
            "extra_body": {"temperature": params["temperature"]},
        }
        if system:
            kwargs["system"] = system
        kwargs.update({k: params[k] for k in ("tools", "tool_choice") if k in params})
        resp = await self.guard(sdk.messages.create(**kwargs))
        text = anthropic_tools.reply_text(resp.content, params.get(anthropic_tools.JSON_TOOL))
        return text, resp.usage.input_tokens, resp.usage.output_tokens

    async def guard(self, call: Awaitable[T]) -> T:
        import anthropic

        return await _guard(call, (anthropic.APIError,))


def make_provider(cfg: ServiceConfig) -> Provider:
    return AnthropicProvider(cfg) if cfg.provider == "anthropic" else OpenAIProvider(cfg)
