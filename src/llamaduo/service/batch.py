"""The OpenAI Batch API flow: cached requests left out, one JSONL upload, poll, download, log.

Management calls (upload, create, poll, cancel, download) go through the same retry helper and
policy as normal calls. Cache keys are those of `chat_json`/`chat_text`, so cached requests are
not sent and batch results replay for later normal calls.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from llamaduo.service.api import BatchRequest, ServiceError, ServiceReply
from llamaduo.service.parsing import parse_reply
from llamaduo.service.retry import ServiceFault, fault_from, retrying

if TYPE_CHECKING:
    from llamaduo.service.client import ServiceClient

T = TypeVar("T")


async def chat_batch(
    client: ServiceClient,
    requests: Sequence[BatchRequest],
    *,
    model: str,
    temperature: float,
    max_tokens: int,
    stage: str,
    round: int | None,
    poll_s: float,
    timeout_s: float,
) -> list[ServiceReply]:
    """Many calls as one provider batch, billed at `service.batch_discount`; replies in input order.

    Each request is `(messages, schema or None for text, meta)` with `meta["sample_index"]`.
    A reply that is not valid JSON for its schema is a failed reply with `raw` kept (no repair
    calls in batch mode). The batch is polled every `poll_s` seconds; after `timeout_s` it is
    cancelled and what is missing fails.
    """
    if client.provider.no_batch_reason:
        raise ServiceError(client.provider.no_batch_reason)
    replies: list[ServiceReply | None] = [None] * len(requests)
    pending: dict[str, list[int]] = {}  # request hash -> input positions (one batch line each hash)
    lines: list[str] = []
    keys: list[tuple[str, int, type[BaseModel] | None]] = []
    for i, (messages, schema, meta) in enumerate(requests):
        sample = int(meta.get("sample_index", 0))
        msgs = [dict(m) for m in messages]
        params = client.params(temperature, max_tokens, schema)
        h = client.request_hash(model, msgs, params, sample)
        keys.append((h, sample, schema))
        hit = client.log.cached(h)
        if hit is not None:
            raw, tin, tout, cost = hit
            client.log.record(ts=time.time(), attempt=0, status="cached", saved_usd=cost, input_tokens=tin,
                              output_tokens=tout, **client.log_fields(stage, round, model, h, sample))
            parsed = parse_reply(raw, schema)[0] if schema is not None else None
            replies[i] = ServiceReply(ok=True, parsed=parsed, raw=raw, cached=True, model=model,
                                      input_tokens=tin, output_tokens=tout, extra={"request_hash": h})
            continue
        if h not in pending:
            body = {"model": model, "messages": msgs, **params}
            lines.append(json.dumps({"custom_id": h, "method": "POST", "url": "/v1/chat/completions", "body": body}))
        pending.setdefault(h, []).append(i)
    if pending:
        client.budget.check()
        results, batch_error, batch_id, latency_ms = await _submit(client, lines, poll_s, timeout_s)
        done: dict[str, ServiceReply] = {}
        for i in (idx[0] for idx in pending.values()):
            h, sample, schema = keys[i]
            done[h] = _reply(client, results.get(h), batch_error, schema, model, h,
                             client.log_fields(stage, round, model, h, sample), latency_ms, batch_id)
        for h, idx in pending.items():
            for n, i in enumerate(idx):  # a duplicate request shares the one answer, paid once
                r = done[h]
                replies[i] = r if n == 0 else dataclasses.replace(r, cost_usd=0.0)
    return [r for r in replies if r is not None]


async def _managed(client: ServiceClient, call: Callable[[], Awaitable[T]]) -> T:
    """One Batch API management call, retried on provider faults like normal calls."""
    return await retrying(lambda _n: client.provider.guard(call()), client.retry, client.sleep)


def _json_line(line: str) -> dict[str, Any]:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:  # the provider's output file is broken
        raise fault_from(e) from e


async def _submit(
    client: ServiceClient, lines: list[str], poll_s: float, timeout_s: float
) -> tuple[dict[str, dict[str, Any]], str | None, str | None, float]:
    """Upload, create, poll, download. Returns (output line by custom_id, batch error, batch id, ms)."""
    sdk = client.sdk()
    t0 = client.clock()
    results: dict[str, dict[str, Any]] = {}
    batch_id = None
    try:
        data = ("\n".join(lines) + "\n").encode()
        upload = await _managed(client, lambda: sdk.files.create(file=("batch.jsonl", data, "application/jsonl"), purpose="batch"))
        batch = await _managed(client, lambda: sdk.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"))
        batch_id = batch.id
        while True:
            batch = await _managed(client, lambda: sdk.batches.retrieve(batch_id))
            status = batch.status
            if status in ("completed", "failed", "expired", "cancelled"):
                break
            if client.clock() - t0 >= timeout_s:
                batch = await _managed(client, lambda: sdk.batches.cancel(batch_id))
                status = f"not finished after {timeout_s:g} s (cancelled)"
                break
            await client.sleep(poll_s)
        # An expired or cancelled batch still returns the lines it finished.
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                content = await _managed(client, lambda fid=file_id: sdk.files.content(fid))
                for line in content.text.splitlines():
                    if line.strip():
                        obj = _json_line(line)
                        results[obj["custom_id"]] = obj
        error = None if status == "completed" else f"batch {batch_id} {status}"
    except ServiceFault as fault:
        error = fault.message
    return results, error, batch_id, (client.clock() - t0) * 1000


def _reply(
    client: ServiceClient, line: dict[str, Any] | None, batch_error: str | None, schema: type[BaseModel] | None,
    model: str, h: str, base: dict[str, Any], latency_ms: float, batch_id: str | None,
) -> ServiceReply:
    """Turn one output line into a logged (and, when good, cached) reply."""
    extra = {"request_hash": h, "batch_id": batch_id}
    response = (line or {}).get("response") or {}
    status_code = response.get("status_code")
    body = response.get("body") or {}
    choices = body.get("choices") if isinstance(body, dict) else None
    if line is None or line.get("error") or status_code != 200 or not choices:
        err = (line or {}).get("error") or (body.get("error") if isinstance(body, dict) else None)
        msg = json.dumps(err)[:300] if err else (batch_error or "no result line for this request")
        if line is not None and status_code not in (None, 200):
            msg = f"http {status_code}: {msg}"
        client.log.record(ts=time.time(), attempt=1, status="failed", http_status=status_code, latency_ms=latency_ms, error=msg, **base)
        return ServiceReply(ok=False, parsed=None, raw=None, error=msg, model=model, attempts=1, extra=extra)
    text = choices[0].get("message", {}).get("content") or ""
    usage = body.get("usage") or {}
    tin, tout = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cost = client.cost(model, tin, tout) * client.cfg.batch_discount
    client.budget.spend(cost, tin + tout)
    parsed, perr = parse_reply(text, schema) if schema is not None else (None, None)
    client.log.record(
        ts=time.time(), attempt=1, status="ok" if perr is None else "invalid_json", http_status=200, latency_ms=latency_ms,
        input_tokens=tin, output_tokens=tout, cost_usd=cost, raw_reply=text, error=perr, **base,
    )
    if perr is None:
        client.log.put_cache(h, model, text, tin, tout, cost)
    return ServiceReply(
        ok=perr is None, parsed=parsed, raw=text, error=perr, model=model,
        input_tokens=tin, output_tokens=tout, cost_usd=cost, attempts=1, extra=extra,
    )
