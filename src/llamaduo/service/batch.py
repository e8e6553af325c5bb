"""The OpenAI Batch API flow: cached requests left out, the rest split into provider batches,
each uploaded, submitted, recorded, polled and downloaded; every reply logged and cached.

A job larger than one provider batch (`service.batch_max_requests` requests or
`service.batch_max_bytes` bytes of JSONL) becomes several batches, all in flight together.
The requests are split in request-hash order, so each batch holds a contiguous range of hashes;
the call log's `batches` table keeps each batch's id, input file, first and last hash, count
and a digest of its hashes from the moment it is submitted. A rerun after the process died
re-attaches to the batches it finds there instead of submitting them again, and submits only
what no batch holds. Management calls (upload, create, poll, cancel, download) go through the
same retry helper and policy as normal calls. Cache keys are those of `chat_json`/`chat_text`,
so cached requests are not sent and batch results replay for later normal calls.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from llamaduo.service.api import BatchRequest, ServiceError, ServiceReply
from llamaduo.service.calllog import BatchRecord
from llamaduo.service.parsing import parse_reply
from llamaduo.service.retry import ServiceFault, fault_from, retrying

if TYPE_CHECKING:
    from llamaduo.service.client import ServiceClient

T = TypeVar("T")

TERMINAL = ("completed", "failed", "expired", "cancelled")


def digest(hashes: Sequence[str]) -> str:
    """Fingerprint of a batch's requests: their hashes, sorted, joined."""
    return hashlib.sha256("".join(hashes).encode()).hexdigest()


def split(hashes: Sequence[str], lines: dict[str, bytes], max_requests: int, max_bytes: int) -> list[list[str]]:
    """Consecutive runs of `hashes` with at most `max_requests` lines and `max_bytes` bytes each
    (a line over `max_bytes` on its own is left out: no batch can carry it)."""
    chunks: list[list[str]] = []
    chunk: list[str] = []
    size = 0
    for h in hashes:
        n = len(lines[h])
        if n > max_bytes:
            continue
        if chunk and (len(chunk) >= max_requests or size + n > max_bytes):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(h)
        size += n
    if chunk:
        chunks.append(chunk)
    return chunks


@dataclasses.dataclass
class _Job:
    """One provider batch being waited for in this call."""

    record: BatchRecord
    members: set[str] | None  # its request hashes; None when a re-attached batch's are not known exactly
    started: float
    status: str = "submitted"
    error: str | None = None
    done: bool = False
    latency_ms: float = 0.0


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
    """Many calls through the Batch API, billed at `service.batch_discount`; replies in input order.

    Each request is `(messages, schema or None for text, meta)` with `meta["sample_index"]`.
    A reply that is not valid JSON for its schema is a failed reply with `raw` kept (no repair
    calls in batch mode). Batches are polled every `poll_s` seconds; after `timeout_s` the
    unfinished ones are cancelled and what is missing fails.
    """
    if client.provider.no_batch_reason:
        raise ServiceError(client.provider.no_batch_reason)
    replies: list[ServiceReply | None] = [None] * len(requests)
    pending: dict[str, list[int]] = {}  # request hash -> input positions (one batch line each hash)
    lines: dict[str, bytes] = {}
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
            lines[h] = (json.dumps({"custom_id": h, "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n").encode()
        pending.setdefault(h, []).append(i)
    if pending:
        client.budget.check()
        results, errors, by_hash, jobs = await _run(client, lines, model, stage, round, poll_s, timeout_s)
        done: dict[str, ServiceReply] = {}
        for i in (idx[0] for idx in pending.values()):
            h, sample, schema = keys[i]
            job = by_hash.get(h)
            done[h] = _reply(client, results.get(h), errors.get(h), schema, model, h,
                             client.log_fields(stage, round, model, h, sample), job)
        for job in jobs:  # committed with the replies above: a rerun finds them cached, not open
            if job.done:  # (one still running at the provider stays open for a rerun to re-attach)
                client.log.batch_status(job.record.batch_id, job.status, done=True)
        client.log.flush()
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


async def _run(
    client: ServiceClient, lines: dict[str, bytes], model: str, stage: str, round: int | None, poll_s: float, timeout_s: float,
) -> tuple[dict[str, dict[str, Any]], dict[str, str], dict[str, _Job], list[_Job]]:
    """Re-attach to recorded batches holding these requests, submit the rest, wait for all.
    Returns (output line by request hash, error by request hash, batch by request hash, batches)."""
    t0 = client.clock()
    results: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    by_hash: dict[str, _Job] = {}
    jobs: list[_Job] = []
    for h, line in lines.items():
        if len(line) > client.cfg.batch_max_bytes:
            errors[h] = f"request of {len(line)} bytes is over service.batch_max_bytes ({client.cfg.batch_max_bytes})"
    hashes = sorted(h for h in lines if h not in errors)  # what batches can carry, in hash order
    # Batches recorded by an earlier run that died: a batch whose range holds exactly the hashes
    # it was submitted with is these requests' batch; one whose range holds others too (the
    # inputs changed since) is waited for, and what it turns out not to hold is sent after it.
    claimed: set[str] = set()
    unsure: set[str] = set()
    for rec in client.log.open_batches(model):
        inside = hashes[bisect.bisect_left(hashes, rec.first_hash): bisect.bisect_right(hashes, rec.last_hash)]
        if not inside:
            continue
        exact = len(inside) == rec.requests and digest(inside) == rec.digest
        job = _Job(rec, set(inside) if exact else None, client.clock(), status=rec.status)
        jobs.append(job)
        (claimed if exact else unsure).update(inside)
        if exact:
            by_hash.update(dict.fromkeys(inside, job))
    fresh = [h for h in hashes if h not in claimed and h not in unsure]
    order = {h: i for i, h in enumerate(lines)}  # `lines` is in input order; each file keeps it
    try:
        for chunk in split(fresh, lines, client.cfg.batch_max_requests, client.cfg.batch_max_bytes):
            jobs.append(await _submit(client, chunk, lines, order, model, stage, round, by_hash))
        await _wait(client, jobs, results, by_hash, poll_s, t0, timeout_s)
        # What re-attached batches of unknown contents did not answer was not in them.
        rest = [h for h in hashes if h in unsure and h not in results and h not in errors]
        if rest:
            later = [await _submit(client, chunk, lines, order, model, stage, round, by_hash)
                     for chunk in split(rest, lines, client.cfg.batch_max_requests, client.cfg.batch_max_bytes)]
            jobs += later
            await _wait(client, later, results, by_hash, poll_s, t0, timeout_s)
    except ServiceFault as fault:  # a management call that kept failing: what has no answer fails
        for h in hashes:
            if h not in results:
                errors.setdefault(h, fault.message)
    for job in jobs:
        if job.members is None:
            continue
        for h in job.members:
            if h not in results and job.error:
                errors.setdefault(h, job.error)
    return results, errors, by_hash, jobs


async def _submit(
    client: ServiceClient, chunk: list[str], lines: dict[str, bytes], order: dict[str, int], model: str, stage: str,
    round: int | None, by_hash: dict[str, _Job],
) -> _Job:
    """Upload one chunk, create its batch and record it before anything else can fail."""
    conn = client.sdk()
    sdk = conn.sdk
    data = b"".join(lines[h] for h in sorted(chunk, key=order.__getitem__))
    upload = await _managed(client, lambda: sdk.files.create(file=("batch.jsonl", data, "application/jsonl"), purpose="batch"))
    fingerprint = digest(chunk)
    batch = await _managed(client, lambda: sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"llamaduo_digest": fingerprint, "llamaduo_requests": str(len(chunk))},
    ))
    record = BatchRecord(
        batch_id=batch.id, input_file_id=upload.id, model=model, stage=stage, round=round,
        first_hash=chunk[0], last_hash=chunk[-1], requests=len(chunk), bytes=len(data), digest=fingerprint,
        status=str(batch.status or "submitted"), submitted_ts=time.time(),
    )
    client.log.add_batch(record)
    job = _Job(record, set(chunk), client.clock(), status=record.status)
    by_hash.update(dict.fromkeys(chunk, job))
    if client.on_batch_submitted is not None:
        client.on_batch_submitted(record)
    return job


async def _wait(
    client: ServiceClient, jobs: list[_Job], results: dict[str, dict[str, Any]], by_hash: dict[str, _Job],
    poll_s: float, t0: float, timeout_s: float,
) -> None:
    """Poll every unfinished batch each `poll_s` until all are finished; `timeout_s` after `t0`
    cancel the rest. Finished batches' output and error lines are collected."""
    sdk = client.sdk().sdk
    deadline = t0 + timeout_s
    while True:
        active = [j for j in jobs if not j.done]
        if not active:
            return
        timed_out = client.clock() >= deadline
        for job in active:
            bid = job.record.batch_id
            batch = await _managed(client, lambda bid=bid: sdk.batches.retrieve(bid))
            status = str(batch.status)
            if status not in TERMINAL and timed_out:
                batch = await _managed(client, lambda bid=bid: sdk.batches.cancel(bid))
                status = f"not finished after {timeout_s:g} s (cancelled)"
                job.status = "cancelled"
            elif status in TERMINAL:
                job.status = status
            else:
                if status != job.status:
                    job.status = status
                    client.log.batch_status(bid, status)
                continue
            # An expired or cancelled batch still returns the lines it finished.
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    content = await _managed(client, lambda fid=file_id: sdk.files.content(fid))
                    for line in content.text.splitlines():
                        if line.strip():
                            obj = _json_line(line)
                            results.setdefault(obj["custom_id"], obj)
                            by_hash.setdefault(obj["custom_id"], job)
            job.error = None if status == "completed" else f"batch {bid} {status}{_batch_errors(batch)}"
            job.latency_ms = (client.clock() - job.started) * 1000
            job.done = True
        if any(not j.done for j in jobs):
            await client.sleep(poll_s)


def _batch_errors(batch: Any) -> str:
    errs = getattr(getattr(batch, "errors", None), "data", None) or []
    msgs = [getattr(e, "message", None) or str(e) for e in errs]
    return f": {'; '.join(m for m in msgs if m)[:300]}" if msgs else ""


def _reply(
    client: ServiceClient, line: dict[str, Any] | None, batch_error: str | None, schema: type[BaseModel] | None,
    model: str, h: str, base: dict[str, Any], job: _Job | None,
) -> ServiceReply:
    """Turn one output line into a logged (and, when good, cached) reply."""
    batch_id = job.record.batch_id if job is not None else None
    latency_ms = job.latency_ms if job is not None else 0.0
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
    row = dict(
        ts=time.time(), attempt=1, status="ok", http_status=200, latency_ms=latency_ms,
        input_tokens=tin, output_tokens=tout, cost_usd=cost, raw_reply=text, **base,
    )
    try:
        parsed, perr = parse_reply(text, schema) if schema is not None else (None, None)
    except BaseException:  # a bug in a validator: the paid reply is still logged
        client.log.record_reply(row, None)
        raise
    if perr is not None:
        row.update(status="invalid_json", error=perr)
    client.log.record_reply(row, (model, text, tin, tout, cost) if perr is None else None)
    return ServiceReply(
        ok=perr is None, parsed=parsed, raw=text, error=perr, model=model,
        input_tokens=tin, output_tokens=tout, cost_usd=cost, attempts=1, extra=extra,
    )
