"""The only network client: calls to the service LLM.

INTERFACE (implementation in progress) — judge/synth/loop depend only on this:

    client = ServiceClient(cfg.service, db_path=store.service_db)
    reply = await client.chat_json(
        messages=[{"role": "user", "content": "..."}],
        schema=SomePydanticModel,      # reply must parse as JSON and validate against it
        model="gpt-4o-mini",
        temperature=0.7,
        max_tokens=512,
        sample_index=0,                # part of the cache key: M judgments of one prompt differ by it
        stage="judge", round=0,        # for the ledger
    )
    reply.ok, reply.parsed, reply.raw, reply.error, reply.cached

    results = client.run(coros)        # sync helper: run many coroutines with progress, return results
    client.close()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass
class ServiceReply:
    ok: bool
    parsed: BaseModel | None
    raw: str | None
    error: str | None = None
    cached: bool = False
    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0
    extra: dict[str, Any] | None = None


class BudgetExceeded(RuntimeError):
    """Raised before a call that would start after the run's budget is spent."""
