"""Answering a request from the service LLM when the local model fails or is too slow.

`serve.py` decides when (generation raised, or ran over `latency_budget_s`); this asks the
service (a `service.ServiceClient`, or anything with an async `chat_text`) for the request's
`n` answers. A failure here too is a 502 that names both causes.
"""

import asyncio
import logging
from typing import TYPE_CHECKING

from llamaduo.chat_api import APIError, ChatRequest, Choice

if TYPE_CHECKING:
    from llamaduo.service import Client

log = logging.getLogger("llamaduo.serve")  # the server's log: fallbacks are part of serving


async def from_service(fallback: "Client", fallback_model: str, req: ChatRequest, reason: str) -> list[Choice]:
    """The request's choices from the service LLM; raises APIError(502) when the service fails as well."""
    log.warning("serving from the service LLM (%s): %s", fallback_model, reason)
    msgs = [m.model_dump() for m in req.messages]
    try:
        replies = await asyncio.gather(
            *[
                fallback.chat_text(
                    msgs, model=fallback_model, temperature=req.sampling.temperature,
                    max_tokens=req.sampling.max_new_tokens, sample_index=i, stage="serve_fallback",
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
    return [
        Choice(text=r.raw or "", completion_tokens=r.output_tokens, prompt_tokens=r.input_tokens) for r in replies
    ]
