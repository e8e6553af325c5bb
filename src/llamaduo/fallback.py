"""Answering a request from the service LLM when the local model fails or is too slow.

`serve.py` decides when (generation raised, or ran over `latency_budget_s`); this asks the
service (a `service.ServiceClient`, or anything with an async `chat_text`) for the request's
`n` answers. A failure here too is a 502 that names both causes.

A request with structure (`tools`, `tool_choice`, `parallel_tool_calls`, `response_format`) goes to
the service with those fields and its OpenAI-shaped turns (tool turns included); the service's
calls come back as `<tool_call>` blocks, which the route reads into `tool_calls` as it reads the
local model's. The OpenAI-compatible provider sends the fields as they are; the native Anthropic
provider maps them onto the Messages API (`service.anthropic_tools`: tools, tool_choice,
parallel_tool_calls, tool turns; a json_schema / json_object format answered through a forced
tool and returned as JSON content). A field a provider cannot carry (for Anthropic: a schema
that is not an object, a non-function tool) is a 502 naming the field, and why — never a plain
answer that silently dropped the structure. The service's answer is checked against the request's
structure as a synthetic pair is (`structure.answer_problem`): one that breaks it (not JSON for
the schema, no call where one is required) is a 502 `fallback_invalid` saying why.
"""

import asyncio
import logging
from typing import TYPE_CHECKING

from llamaduo.chat_api import APIError, ChatRequest, Choice

if TYPE_CHECKING:
    from llamaduo.service import Client, UnsupportedField

log = logging.getLogger("llamaduo.serve")  # the server's log: fallbacks are part of serving


def _refusal(fallback: "Client | None", req: ChatRequest) -> "UnsupportedField | None":
    provider = getattr(fallback, "provider", None)
    if fallback is None or not req.request_fields or provider is None:
        return None
    from llamaduo.service import UnsupportedField

    try:
        provider.request_fields(req.request_fields)
    except UnsupportedField as e:
        return e
    return None


def cannot_carry(fallback: "Client | None", req: ChatRequest) -> str | None:
    """The first of the request's structure fields the fallback cannot send, or None."""
    refused = _refusal(fallback, req)
    return refused.field if refused is not None else None


def off_contract(req: ChatRequest, text: str) -> str | None:
    """Why the service's answer breaks the request's structure (a schema, a forced call), or None.
    The local model cannot break it (constrained decoding); the service is checked as the synthesis
    stage checks its pairs (`structure.answer_problem`), so a 200 always keeps the contract."""
    if not req.request_fields:
        return None
    from llamaduo import structure
    from llamaduo.data import Example, Message

    turns = [Message(role="user", content="-"), Message(role="assistant", content="-")]
    try:
        task = Example(id="fallback", messages=turns, **req.request_fields)
    except ValueError as e:  # unverified is not passed on as kept
        return f"its structure could not be checked ({str(e).splitlines()[0]})"
    return structure.answer_problem(task, text)


async def from_service(fallback: "Client", fallback_model: str, req: ChatRequest, reason: str) -> list[Choice]:
    """The request's choices from the service LLM; raises APIError(502) when the service fails as well,
    or cannot carry the request's structure."""
    refused = _refusal(fallback, req)
    if refused is not None:
        why = f" ({refused.why})" if refused.why else ""
        raise APIError(502, f"local model failed ({reason}) and the fallback service ({refused.provider} provider) "
                       f"cannot carry {refused.field}{why}: not answered without it", refused.field,
                       "fallback_unsupported", "server_error")
    log.warning("serving from the service LLM (%s): %s", fallback_model, reason)
    structured = {"request_fields": req.request_fields} if req.request_fields else {}
    msgs = req.conversation if structured else [m.openai() for m in req.messages]
    try:
        replies = await asyncio.gather(
            *[
                fallback.chat_text(
                    msgs, model=fallback_model, temperature=req.sampling.temperature,
                    max_tokens=req.sampling.max_new_tokens, sample_index=i, stage="serve_fallback", **structured,
                )
                for i in range(req.n)
            ]
        )
        errors = [r.error for r in replies if not r.ok]
    except Exception as e:  # budget spent, missing key, ...
        errors = [f"{type(e).__name__}: {e}"]
    if errors:
        raise APIError(502, f"local model failed ({reason}) and the service LLM failed: {errors[0]}",
                       None, "fallback_failed", "server_error")
    why = next(filter(None, (off_contract(req, r.raw or "") for r in replies)), None)
    if why is not None:
        raise APIError(502, f"local model failed ({reason}) and the service LLM's answer does not fit the request: "
                       f"{why}", "response_format" if "response_format" in req.request_fields else "tools",
                       "fallback_invalid", "server_error")
    return [
        Choice(text=r.raw or "", completion_tokens=r.output_tokens, prompt_tokens=r.input_tokens) for r in replies
    ]
