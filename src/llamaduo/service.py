"""The only network client: calls to the service LLM.

    client = ServiceClient(cfg.service, db_path=store.service_db)
    reply = await client.chat_json(messages, schema=JudgeReply, model="gpt-4o", temperature=0.7,
                                   max_tokens=512, sample_index=3, stage="judge", round=0)
    reply.ok, reply.parsed, reply.raw, reply.error, reply.cached
    results = client.run([coro, ...], description="judging")   # in order, with a progress bar
    replies = client.run_batch([(messages, JudgeReply, {"sample_index": 3}), ...], model="gpt-4o",
                               temperature=0.7, max_tokens=512, stage="judge", round=0)  # Batch API

Every attempt is logged in SQLite (`service.sqlite`, see `calllog`): request hash, model, tokens, cost,
latency, status, raw reply. Successful replies are cached by content (provider, model,
messages, parameters, sample index), so a rerun with unchanged inputs sends nothing. Service
faults (429, 5xx, timeouts, malformed JSON) are retried within limits and never raise; only
`BudgetExceeded` does, so the loop can stop cleanly. API keys are read from the environment
at call time and never written anywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ValidationError

from llamaduo.calllog import CallLog, ledger_from_db
from llamaduo.config import ServiceConfig
from llamaduo.errors import UserError
from llamaduo.pacing import Pacer


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


class ServiceError(UserError):
    """A configuration problem with the service (missing key, unknown provider)."""


BatchRequest = tuple[list[dict[str, str]], type[BaseModel] | None, dict[str, Any]]
"""One `run_batch` request: (messages, schema or None for a text reply, meta with `sample_index`)."""


# ---------------------------------------------------------------------- parsing
def extract_json(text: str) -> Any:
    """Parse JSON from an LLM reply: plain, inside ``` fences, or the first {...} in prose."""
    t = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", t, re.S)
    if fence:
        t = fence.group(1).strip()
    try:
        return json.loads(t)
    except json.JSONDecodeError:
        pass
    start = t.find("{")
    if start < 0:
        raise ValueError("no JSON object in the reply")
    obj, _ = json.JSONDecoder().raw_decode(t[start:])
    return obj


def parse_reply(text: str, schema: type[BaseModel]) -> tuple[BaseModel | None, str | None]:
    try:
        return schema.model_validate(extract_json(text)), None
    except (ValueError, ValidationError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, f"invalid JSON for {schema.__name__}: {msg}"


def strict_schema(schema: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema in the form strict structured output accepts: every object
    closed (`additionalProperties: false`) and every property listed as required."""

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node["additionalProperties"] = False
                node["required"] = list(node["properties"])
            for v in node.values():
                close(v)
        elif isinstance(node, list):
            for v in node:
                close(v)

    out = schema.model_json_schema()
    close(out)
    return out


# ---------------------------------------------------------------------- client
class ServiceClient:
    def __init__(
        self,
        cfg: ServiceConfig,
        db_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        api_key: str | None = None,
    ):
        self.cfg = cfg
        self.clock = clock
        self.sleep = sleep
        self._api_key = api_key
        self.log = CallLog(db_path)
        self.pacer = Pacer(cfg.rpm, cfg.tpm, clock)
        self._sdk: Any = None
        self._sdk_loop: Any = None
        self._sem: asyncio.Semaphore | None = None
        self._budget_usd, self._budget_tokens = self.log.totals()

    # ---- plumbing
    def _key(self) -> str:
        if self._api_key:
            return self._api_key
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            return key
        host = urlparse(self.cfg.base_url or "").hostname or ""
        if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
            return "not-needed"  # local servers usually ignore the key
        raise ServiceError(f"service.api_key_env: environment variable {self.cfg.api_key_env} is not set")

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._sdk is None or self._sdk_loop is not loop:
            if self.cfg.provider == "anthropic":
                import anthropic

                self._sdk = anthropic.AsyncAnthropic(
                    api_key=self._key(), base_url=self.cfg.base_url, max_retries=0, timeout=self.cfg.timeout_s
                )
            else:
                import openai

                self._sdk = openai.AsyncOpenAI(
                    api_key=self._key(), base_url=self.cfg.base_url, max_retries=0, timeout=self.cfg.timeout_s
                )
            self._sdk_loop = loop
            self._sem = asyncio.Semaphore(self.cfg.concurrency)
        return self._sdk

    def price(self, model: str) -> tuple[float, float] | None:
        prices = self.cfg.prices
        if model in prices:
            p = prices[model]
        else:
            match = max((k for k in prices if model.startswith(k)), key=len, default=None)
            if match is None:
                return None
            p = prices[match]
        return p.input_per_mtok, p.output_per_mtok

    def cost(self, model: str, tin: int, tout: int) -> float:
        p = self.price(model)
        return 0.0 if p is None else (tin * p[0] + tout * p[1]) / 1e6

    def _check_budget(self) -> None:
        if self.cfg.max_usd is not None and self._budget_usd >= self.cfg.max_usd:
            raise BudgetExceeded(f"spent ${self._budget_usd:.4f} of max_usd ${self.cfg.max_usd}")
        if self.cfg.max_tokens is not None and self._budget_tokens >= self.cfg.max_tokens:
            raise BudgetExceeded(f"used {self._budget_tokens} of max_tokens {self.cfg.max_tokens}")

    def request_hash(self, model: str, messages: list[dict[str, str]], params: dict[str, Any], sample_index: int) -> str:
        blob = json.dumps(
            {"provider": self.cfg.provider, "model": model, "messages": messages, "params": params, "sample": sample_index},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    # ---- one HTTP exchange
    async def _send(self, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> tuple[str, int, int]:
        sdk = self._client()
        if self.cfg.provider == "anthropic":
            system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
            rest = [m for m in messages if m["role"] != "system"]
            # temperature travels as a body field: SDK releases differ in the keywords they accept.
            kwargs: dict[str, Any] = {
                "model": model, "messages": rest, "max_tokens": params["max_tokens"],
                "extra_body": {"temperature": params["temperature"]},
            }
            if system:
                kwargs["system"] = system
            resp = await sdk.messages.create(**kwargs)
            text = "".join(getattr(b, "text", "") for b in resp.content)
            return text, resp.usage.input_tokens, resp.usage.output_tokens
        resp = await sdk.chat.completions.create(model=model, messages=messages, **params)
        if not getattr(resp, "choices", None):
            raise _Malformed("reply has no choices")
        text = resp.choices[0].message.content or ""
        usage = getattr(resp, "usage", None)
        tin = getattr(usage, "prompt_tokens", 0) or 0
        tout = getattr(usage, "completion_tokens", 0) or 0
        return text, tin, tout

    async def _call(
        self,
        model: str,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        sample_index: int,
        stage: str,
        round: int | None,
    ) -> tuple[str | None, int, int, float, int, str | None, bool, str]:
        """Cached call with retries. Returns (text, tin, tout, cost, attempts, error, cached, hash)."""
        h = self.request_hash(model, messages, params, sample_index)
        base = {"stage": stage, "round": round, "provider": self.cfg.provider, "model": model, "request_hash": h, "sample_index": sample_index}
        hit = self.log.cached(h)
        if hit is not None:
            raw, tin, tout, cost = hit
            self.log.record(ts=time.time(), attempt=0, status="cached", saved_usd=cost, input_tokens=tin, output_tokens=tout, **base)
            return raw, tin, tout, 0.0, 0, None, True, h
        self._check_budget()
        self._client()
        assert self._sem is not None
        est = sum(len(m["content"]) for m in messages) // 4 + int(params.get("max_tokens", 0))
        error = None
        attempt = 0
        for attempt in range(1, self.cfg.max_retries + 2):
            # The slot is booked while holding the semaphore, so a request never waits for a
            # worker after its paced time (which would bunch requests up past the limit).
            async with self._sem:
                wait = self.pacer.reserve(est)
                while wait > 0:
                    await self.sleep(wait)
                    wait = self.pacer.wait_left()  # a 429 seen meanwhile holds everyone
                self._check_budget()  # spending may have crossed the budget while we waited
                t0 = time.monotonic()
                try:
                    text, tin, tout = await asyncio.wait_for(self._send(model, messages, params), self.cfg.timeout_s + 5)
                    failure = None
                except Exception as e:  # classify every provider/transport failure the same way
                    if not _is_service_fault(e):
                        raise  # a bug on our side: retrying would only hide it
                    failure = e
            if failure is not None:
                status, http_status, retry_after, error = _classify(failure)
                self.pacer.correct(est, 0)
                self.log.record(ts=time.time(), attempt=attempt, status=status, http_status=http_status, latency_ms=(time.monotonic() - t0) * 1000, error=error, **base)
                if status == "client_error" or attempt > self.cfg.max_retries:
                    break
                delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
                delay = delay * (0.5 + random.random() / 2)
                if retry_after is not None:
                    delay = max(delay, retry_after)
                    self.pacer.back_off(delay)  # every worker waits: no 429 storm
                await self.sleep(delay)
                continue
            cost = self.cost(model, tin, tout)
            self.pacer.correct(est, tin + tout)
            self._budget_usd += cost
            self._budget_tokens += tin + tout
            self.log.record(
                ts=time.time(), attempt=attempt, status="ok", http_status=200, latency_ms=(time.monotonic() - t0) * 1000,
                input_tokens=tin, output_tokens=tout, cost_usd=cost, raw_reply=text, **base,
            )
            return text, tin, tout, cost, attempt, None, False, h
        self.log.record(ts=time.time(), attempt=attempt, status="failed", error=error, **base)
        return None, 0, 0, 0.0, attempt, error, False, h

    # ---- public API
    def _params(self, temperature: float, max_tokens: int, schema: type[BaseModel] | None) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens}
        if schema is not None and self.cfg.provider == "openai":
            if self.cfg.structured_output == "json_object":
                params["response_format"] = {"type": "json_object"}
            elif self.cfg.structured_output == "json_schema":
                params["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": schema.__name__, "schema": strict_schema(schema), "strict": True},
                }
        return params

    async def chat_json(
        self,
        messages: list[dict[str, str]],
        schema: type[BaseModel],
        *,
        model: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        sample_index: int = 0,
        stage: str = "",
        round: int | None = None,
    ) -> ServiceReply:
        """One structured call. A reply that is not valid JSON for `schema` gets bounded repair retries."""
        model = model or self.cfg.model
        params = self._params(temperature, max_tokens, schema)
        convo = [dict(m) for m in messages]
        total = ServiceReply(ok=False, parsed=None, raw=None, model=model)
        first_hash = None
        for repair in range(self.cfg.json_retries + 1):
            text, tin, tout, cost, attempts, error, cached, h = await self._call(model, convo, params, sample_index, stage, round)
            first_hash = first_hash or h
            total.input_tokens += tin
            total.output_tokens += tout
            total.cost_usd += cost
            total.attempts += attempts
            total.cached = cached if repair == 0 else total.cached and cached
            if text is None:
                total.error = error
                return total
            total.raw = text
            parsed, perr = parse_reply(text, schema)
            if parsed is not None:
                if not cached:  # only replies that parsed are worth replaying
                    self.log.put_cache(h, model, text, tin, tout, cost)
                    if first_hash and first_hash != h:  # a rerun replays the repaired answer at once
                        self.log.put_cache(first_hash, model, text, tin, tout, cost)
                total.ok, total.parsed, total.error = True, parsed, None
                return total
            total.error = perr
            # Ask again with the bad reply in view; the changed messages change the cache key.
            convo = convo[: len(messages)] + [
                {"role": "assistant", "content": text[:4000]},
                {"role": "user", "content": f"That reply was not valid JSON for the required format ({perr}). Reply with the JSON object only."},
            ]
        return total

    async def chat_text(
        self,
        messages: list[dict[str, str]],
        *,
        model: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        sample_index: int = 0,
        stage: str = "",
        round: int | None = None,
    ) -> ServiceReply:
        """One plain-text call (e.g. the service baseline's own answers)."""
        model = model or self.cfg.model
        params = self._params(temperature, max_tokens, None)
        text, tin, tout, cost, attempts, error, cached, h = await self._call(
            model, [dict(m) for m in messages], params, sample_index, stage, round
        )
        if text is not None and not cached:
            self.log.put_cache(h, model, text, tin, tout, cost)
        return ServiceReply(
            ok=text is not None, parsed=None, raw=text, error=error, cached=cached, model=model,
            input_tokens=tin, output_tokens=tout, cost_usd=cost, attempts=attempts,
        )

    # ---- Batch API
    def run_batch(
        self,
        requests: Sequence[BatchRequest],
        *,
        model: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        stage: str = "",
        round: int | None = None,
        poll_s: float = 5.0,
        timeout_s: float = 86400.0,
    ) -> list[ServiceReply]:
        """Blocking form of `chat_batch`, for stages that call `run` for their normal calls."""
        return asyncio.run(self._closing(self.chat_batch(
            requests, model=model, temperature=temperature, max_tokens=max_tokens,
            stage=stage, round=round, poll_s=poll_s, timeout_s=timeout_s,
        )))

    async def _closing(self, coro: Awaitable[Any]) -> Any:
        try:
            return await coro
        finally:
            if self._sdk is not None and self._sdk_loop is asyncio.get_running_loop():
                await self._sdk.close()
                self._sdk = None

    async def chat_batch(
        self,
        requests: Sequence[BatchRequest],
        *,
        model: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        stage: str = "",
        round: int | None = None,
        poll_s: float = 5.0,
        timeout_s: float = 86400.0,
    ) -> list[ServiceReply]:
        """Many calls as one provider batch, billed at `service.batch_discount`; replies in input order.

        Each request is `(messages, schema or None for text, meta)` with `meta["sample_index"]`.
        Cache keys are those of `chat_json`/`chat_text`, so cached requests are not sent and
        batch results replay for later normal calls. A reply that is not valid JSON for its
        schema is a failed reply with `raw` kept (no repair calls in batch mode). The batch is
        polled every `poll_s` seconds; after `timeout_s` it is cancelled and what is missing fails.
        """
        if self.cfg.provider == "anthropic":
            raise ServiceError("batch mode is available for OpenAI-compatible providers; Anthropic Message Batches are not wired yet")
        model = model or self.cfg.model
        replies: list[ServiceReply | None] = [None] * len(requests)
        pending: dict[str, list[int]] = {}  # request hash -> input positions (one batch line each hash)
        lines: list[str] = []
        keys: list[tuple[str, int, type[BaseModel] | None]] = []
        for i, (messages, schema, meta) in enumerate(requests):
            sample = int(meta.get("sample_index", 0))
            msgs = [dict(m) for m in messages]
            params = self._params(temperature, max_tokens, schema)
            h = self.request_hash(model, msgs, params, sample)
            keys.append((h, sample, schema))
            hit = self.log.cached(h)
            if hit is not None:
                raw, tin, tout, cost = hit
                self.log.record(ts=time.time(), attempt=0, status="cached", saved_usd=cost, input_tokens=tin,
                                output_tokens=tout, **self._base(stage, round, model, h, sample))
                parsed = parse_reply(raw, schema)[0] if schema is not None else None
                replies[i] = ServiceReply(ok=True, parsed=parsed, raw=raw, cached=True, model=model,
                                          input_tokens=tin, output_tokens=tout, extra={"request_hash": h})
                continue
            if h not in pending:
                body = {"model": model, "messages": msgs, **params}
                lines.append(json.dumps({"custom_id": h, "method": "POST", "url": "/v1/chat/completions", "body": body}))
            pending.setdefault(h, []).append(i)
        if pending:
            self._check_budget()
            results, batch_error, batch_id, latency_ms = await self._submit_batch(lines, poll_s, timeout_s)
            done: dict[str, ServiceReply] = {}
            for i in (idx[0] for idx in pending.values()):
                h, sample, schema = keys[i]
                done[h] = self._batch_result(results.get(h), batch_error, schema, model, h,
                                             self._base(stage, round, model, h, sample), latency_ms, batch_id)
            for h, idx in pending.items():
                for n, i in enumerate(idx):  # a duplicate request shares the one answer, paid once
                    r = done[h]
                    replies[i] = r if n == 0 else dataclasses.replace(r, cost_usd=0.0)
        return [r for r in replies if r is not None]

    def _base(self, stage: str, round: int | None, model: str, h: str, sample: int) -> dict[str, Any]:
        return {"stage": stage, "round": round, "provider": self.cfg.provider, "model": model, "request_hash": h, "sample_index": sample}

    async def _retrying(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """One Batch API management call, retried on service faults like normal calls."""
        for attempt in range(1, self.cfg.max_retries + 2):
            try:
                return await fn()
            except Exception as e:
                if not _is_service_fault(e):
                    raise
                status, _, retry_after, _ = _classify(e)
                if status == "client_error" or attempt > self.cfg.max_retries:
                    raise
                delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
                await self.sleep(max(delay, retry_after or 0.0))

    async def _submit_batch(
        self, lines: list[str], poll_s: float, timeout_s: float
    ) -> tuple[dict[str, dict[str, Any]], str | None, str | None, float]:
        """Upload, create, poll, download. Returns (output line by custom_id, batch error, batch id, ms)."""
        sdk = self._client()
        t0 = self.clock()
        results: dict[str, dict[str, Any]] = {}
        batch_id = None
        try:
            data = ("\n".join(lines) + "\n").encode()
            upload = await self._retrying(lambda: sdk.files.create(file=("batch.jsonl", data, "application/jsonl"), purpose="batch"))
            batch = await self._retrying(lambda: sdk.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"))
            batch_id = batch.id
            while True:
                batch = await self._retrying(lambda: sdk.batches.retrieve(batch_id))
                status = batch.status
                if status in ("completed", "failed", "expired", "cancelled"):
                    break
                if self.clock() - t0 >= timeout_s:
                    batch = await self._retrying(lambda: sdk.batches.cancel(batch_id))
                    status = f"not finished after {timeout_s:g} s (cancelled)"
                    break
                await self.sleep(poll_s)
            # An expired or cancelled batch still returns the lines it finished.
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    content = await self._retrying(lambda fid=file_id: sdk.files.content(fid))
                    for line in content.text.splitlines():
                        if line.strip():
                            obj = json.loads(line)
                            results[obj["custom_id"]] = obj
            error = None if status == "completed" else f"batch {batch_id} {status}"
        except Exception as e:
            if not _is_service_fault(e):
                raise
            error = _classify(e)[3]
        return results, error, batch_id, (self.clock() - t0) * 1000

    def _batch_result(
        self, line: dict[str, Any] | None, batch_error: str | None, schema: type[BaseModel] | None,
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
            self.log.record(ts=time.time(), attempt=1, status="failed", http_status=status_code, latency_ms=latency_ms, error=msg, **base)
            return ServiceReply(ok=False, parsed=None, raw=None, error=msg, model=model, attempts=1, extra=extra)
        text = choices[0].get("message", {}).get("content") or ""
        usage = body.get("usage") or {}
        tin, tout = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        cost = self.cost(model, tin, tout) * self.cfg.batch_discount
        self._budget_usd += cost
        self._budget_tokens += tin + tout
        parsed, perr = parse_reply(text, schema) if schema is not None else (None, None)
        self.log.record(
            ts=time.time(), attempt=1, status="ok" if perr is None else "invalid_json", http_status=200, latency_ms=latency_ms,
            input_tokens=tin, output_tokens=tout, cost_usd=cost, raw_reply=text, error=perr, **base,
        )
        if perr is None:
            self.log.put_cache(h, model, text, tin, tout, cost)
        return ServiceReply(
            ok=perr is None, parsed=parsed, raw=text, error=perr, model=model,
            input_tokens=tin, output_tokens=tout, cost_usd=cost, attempts=1, extra=extra,
        )

    def run(self, coros: Sequence[Awaitable[Any]], description: str = "service calls", progress: bool = True) -> list[Any]:
        """Run coroutines concurrently (the semaphore caps calls in flight); results in order."""
        return asyncio.run(self._gather(list(coros), description, progress))

    async def _gather(self, coros: list[Awaitable[Any]], description: str, progress: bool) -> list[Any]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from llamaduo.progress import RateColumn

        results: list[Any] = [None] * len(coros)

        async def one(i: int, c: Awaitable[Any]) -> None:
            results[i] = await c

        tasks = [asyncio.ensure_future(one(i, c)) for i, c in enumerate(coros)]
        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn("calls"),
            TimeRemainingColumn(), disable=not progress, transient=True,
        )
        try:
            with bar:
                tid = bar.add_task(description, total=len(tasks))
                for fut in asyncio.as_completed(tasks):
                    await fut
                    bar.advance(tid)
        except BudgetExceeded:
            # Calls in flight finish and are recorded; the others stop at their budget check.
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if self._sdk is not None and self._sdk_loop is asyncio.get_running_loop():
                await self._sdk.close()
                self._sdk = None
        return results

    def ledger(self) -> dict[str, Any]:
        """Totals overall and per stage/round, plus the models that had no price (costed at 0)."""
        with self.log.lock:
            out = ledger_from_db(self.log.conn)
            models = [m for (m,) in self.log.conn.execute("SELECT DISTINCT model FROM calls WHERE status='ok'")]
        out["unpriced_models"] = sorted(m for m in models if m and self.price(m) is None)
        return out

    def close(self) -> None:
        self.log.close()


class _Malformed(Exception):
    pass


def _is_service_fault(e: Exception) -> bool:
    """Errors of the provider, the transport or the reply, as opposed to bugs in our code."""
    if isinstance(e, (TimeoutError, asyncio.TimeoutError, ConnectionError, ValueError, _Malformed)):
        return True  # ValueError: a reply body that is not JSON or not the expected shape
    return type(e).__module__.split(".")[0] in ("openai", "anthropic", "httpx", "httpcore")


def _classify(e: Exception) -> tuple[str, int | None, float | None, str]:
    """(status, http status, retry-after seconds, one-line error) for any call failure."""
    status_code = getattr(e, "status_code", None)
    response = getattr(e, "response", None)
    headers = getattr(response, "headers", None) or {}
    retry_after = _retry_after(headers)
    name = type(e).__name__
    msg = f"{name}: {str(e).splitlines()[0][:300]}" if str(e) else name
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)) or "Timeout" in name:
        return "timeout", None, None, msg
    if status_code == 429:
        return "http_429", 429, retry_after if retry_after is not None else None, msg
    if isinstance(status_code, int) and status_code >= 500:
        return f"http_{status_code}", status_code, retry_after, msg
    if isinstance(status_code, int) and status_code in (408, 409):
        return f"http_{status_code}", status_code, retry_after, msg
    if isinstance(status_code, int) and 400 <= status_code < 500:
        return "client_error", status_code, None, msg
    if "Connection" in name:
        return "connection_error", None, None, msg
    return "malformed", None, None, msg


def _retry_after(headers: Any) -> float | None:
    for key in ("retry-after", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        v = headers.get(key) if hasattr(headers, "get") else None
        if v is None:
            continue
        m = re.fullmatch(r"\s*([\d.]+)\s*(ms|s)?\s*", str(v))
        if m:
            return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    return None
