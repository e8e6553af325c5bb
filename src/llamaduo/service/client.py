"""`ServiceClient`: the call path (cache, budget, pacing, retries, call log) and the event-loop runner."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from llamaduo.config import ServiceConfig
from llamaduo.service import batch, keys, pricing
from llamaduo.service.api import BatchRequest, BudgetExceeded, ProgressReporter, ServiceReply
from llamaduo.service.calllog import BatchRecord, CallLog
from llamaduo.service.pacing import Pacer
from llamaduo.service.parsing import parse_reply, repair_messages
from llamaduo.service.providers import make_provider
from llamaduo.service.retry import RetryPolicy, ServiceFault, fault_from, retrying

T = TypeVar("T")

# (text or None, input tokens, output tokens, cost, attempts, error, cached, request hash, the
# answered attempt's call-log row, written once the caller knows whether the reply is cached)
_CallResult = tuple[str | None, int, int, float, int, str | None, bool, str, "dict[str, Any] | None"]

# Faults that announce a wait (429, or 503 with Retry-After) hold every worker when their headers
# say the limit is spent, or when this many come in a row with no success between them. One on
# its own (a provider hiccup) only delays its own retry: at thousands of calls a minute, holding
# everyone for each would cost more than the hiccups do.
HOLD_AFTER_FAULTS = 3


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
        self.provider = make_provider(cfg)  # chosen once: the call path has no provider branches
        self.log = CallLog(db_path)
        self.pacer = Pacer(cfg.rpm, cfg.tpm, clock)
        self.retry = RetryPolicy(cfg.max_retries, cfg.backoff_base_s, cfg.backoff_max_s)
        self.budget = pricing.Budget(cfg, *self.log.totals())
        self.on_batch_submitted: Callable[[BatchRecord], None] | None = None  # told after each batch is recorded
        self._sdk: Any = None
        self._sdk_loop: Any = None
        self._sem: asyncio.Semaphore | None = None
        self._fault_run = 0  # faults with Retry-After since the last success
        # Prompt tokens per estimated prompt token, learnt from the usage replies report (TPM
        # pacing books a request before its usage is known). Starts at 1 with a small weight.
        self._prompt_est_sum = 1000.0
        self._prompt_seen_sum = 1000.0

    # ---- plumbing
    def _key(self) -> str:
        return self._api_key or keys.api_key(self.cfg)

    def sdk(self) -> Any:
        """The provider's connection for the running event loop (each `run` has its own loop)."""
        loop = asyncio.get_running_loop()
        if self._sdk is None or self._sdk_loop is not loop:
            self._sdk = self.provider.connect(self._key())
            self._sdk_loop = loop
            self._sem = asyncio.Semaphore(self.cfg.concurrency)
        return self._sdk

    async def _close_sdk(self) -> None:
        if self._sdk is not None and self._sdk_loop is asyncio.get_running_loop():
            await self._sdk.close()
            self._sdk = None

    def price(self, model: str) -> tuple[float, float] | None:
        return pricing.price(self.cfg.prices, model)

    def cost(self, model: str, tin: int, tout: int) -> float:
        return pricing.cost(self.cfg.prices, model, tin, tout)

    def request_hash(self, model: str, messages: list[dict[str, str]], params: dict[str, Any], sample_index: int) -> str:
        # Unchanged since the first release: existing call logs' cache entries must keep matching.
        blob = json.dumps(
            {"provider": self.cfg.provider, "model": model, "messages": messages, "params": params, "sample": sample_index},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def log_fields(self, stage: str, round: int | None, model: str, h: str, sample: int) -> dict[str, Any]:
        return {"stage": stage, "round": round, "provider": self.cfg.provider, "model": model, "request_hash": h, "sample_index": sample}

    def params(self, temperature: float, max_tokens: int, schema: type[BaseModel] | None) -> dict[str, Any]:
        return self.provider.params(temperature, max_tokens, schema)

    def _prompt_chars_estimate(self, messages: list[dict[str, str]]) -> float:
        # ~4 characters a token, plus ~4 tokens of chat framing per message.
        return (sum(len(m["content"]) for m in messages) + 16 * len(messages)) / 4

    # ---- one cached call with retries
    async def _call(
        self, model: str, messages: list[dict[str, str]], params: dict[str, Any], sample_index: int, stage: str, round: int | None,
    ) -> _CallResult:
        h = self.request_hash(model, messages, params, sample_index)
        base = self.log_fields(stage, round, model, h, sample_index)
        hit = self.log.cached(h)
        if hit is not None:
            raw, tin, tout, cost = hit
            self.log.record(ts=time.time(), attempt=0, status="cached", saved_usd=cost, input_tokens=tin, output_tokens=tout, **base)
            return raw, tin, tout, 0.0, 0, None, True, h, None
        self.budget.check()
        conn = self.sdk()
        assert self._sem is not None
        sem = self._sem
        # What a provider counts against a TPM limit when the request arrives: its prompt and
        # its max_tokens (OpenAI's rule), so that is what is booked and, later, settled.
        max_tokens = int(params.get("max_tokens", 0))
        prompt_chars = self._prompt_chars_estimate(messages)
        tries, t0, est = 0, time.monotonic(), 0

        async def attempt(n: int) -> tuple[str, int, int]:
            nonlocal tries, t0, est
            tries = n
            # The slot is booked while holding the semaphore, so a request never waits for a
            # worker after its paced time (which would bunch requests up past the limit).
            async with sem:
                est = math.ceil(prompt_chars * self._prompt_seen_sum / self._prompt_est_sum) + max_tokens
                wait = self.pacer.reserve(est)
                while wait > 0:
                    await self.sleep(wait)
                    wait = self.pacer.wait_left()  # a 429 seen meanwhile holds everyone
                self.budget.check()  # spending may have crossed the budget while we waited
                t0 = time.monotonic()
                # Logged before it goes out (a kill now leaves it unanswered), with the most it can cost.
                in_tokens = est - max_tokens
                sent = self.log.sending(h, n, stage, round, self.cost(model, in_tokens, max_tokens), est)
                try:
                    return await asyncio.wait_for(self.provider.send(conn, model, messages, params), self.cfg.timeout_s + 5)
                except asyncio.TimeoutError as e:  # our own deadline, above the transport's
                    raise fault_from(e) from e
                finally:
                    self.log.answered(sent)

        def on_fault(fault: ServiceFault, n: int, delay: float | None) -> None:
            if fault.http_status is not None:
                self.pacer.release(est)  # answered with an error status: refused, not counted
            else:
                self.pacer.correct(est, 0)  # a timeout or a broken connection: no tokens used
            self.log.record(ts=time.time(), attempt=n, status=fault.status, http_status=fault.http_status,
                            latency_ms=(time.monotonic() - t0) * 1000, error=fault.message, **base)
            if fault.retry_after is not None:
                self._fault_run += 1
                if delay is not None and (fault.limit_spent or self._fault_run >= HOLD_AFTER_FAULTS):
                    self.pacer.back_off(delay)  # every worker waits: no 429 storm

        try:
            text, tin, tout = await retrying(attempt, self.retry, self.sleep, on_fault)
        except ServiceFault as fault:
            self.log.record(ts=time.time(), attempt=tries, status="failed", error=fault.message, **base)
            return None, 0, 0, 0.0, tries, fault.message, False, h, None
        self._fault_run = 0
        if tin > 0:
            self._prompt_est_sum += prompt_chars
            self._prompt_seen_sum += tin
        cost = self.cost(model, tin, tout)
        self.pacer.correct(est, tin + max_tokens)
        self.budget.spend(cost, tin + tout)
        row = dict(
            ts=time.time(), attempt=tries, status="ok", http_status=200, latency_ms=(time.monotonic() - t0) * 1000,
            input_tokens=tin, output_tokens=tout, cost_usd=cost, raw_reply=text, **base,
        )
        return text, tin, tout, cost, tries, None, False, h, row

    # ---- public API
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
        params = self.params(temperature, max_tokens, schema)
        convo = [dict(m) for m in messages]
        total = ServiceReply(ok=False, parsed=None, raw=None, model=model)
        first_hash = None
        for repair in range(self.cfg.json_retries + 1):
            text, tin, tout, cost, attempts, error, cached, h, row = await self._call(
                model, convo, params, sample_index, stage, round
            )
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
            try:
                parsed, perr = parse_reply(text, schema)
            except BaseException:  # a bug in a validator: the attempt is still logged, with its reply
                if row is not None:
                    self.log.record_reply(row, None)
                raise
            if row is not None:  # only replies that parsed are worth replaying
                self.log.record_reply(row, (model, text, tin, tout, cost) if parsed is not None else None)
            if parsed is not None:
                if not cached and first_hash != h:  # a rerun replays the repaired answer at once
                    self.log.put_cache(first_hash, model, text, tin, tout, cost)
                total.ok, total.parsed, total.error = True, parsed, None
                return total
            total.error = perr
            convo = repair_messages(convo[: len(messages)], text, perr or "")
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
        request_fields: dict[str, Any] | None = None,
    ) -> ServiceReply:
        """One plain-text call (e.g. the service baseline's own answers).

        `request_fields`: an application's tools / tool_choice / parallel_tool_calls / response_format,
        sent along (raises `UnsupportedField` where the provider cannot carry one); the reply's
        tool calls come back in `raw` as `<tool_call>` blocks."""
        model = model or self.cfg.model
        params = self.params(temperature, max_tokens, None)
        if request_fields:
            params = {**params, **self.provider.request_fields(request_fields)}
        text, tin, tout, cost, attempts, error, cached, h, row = await self._call(
            model, [dict(m) for m in messages], params, sample_index, stage, round
        )
        if text is not None and row is not None:
            self.log.record_reply(row, (model, text, tin, tout, cost))
        return ServiceReply(
            ok=text is not None, parsed=None, raw=text, error=error, cached=cached, model=model,
            input_tokens=tin, output_tokens=tout, cost_usd=cost, attempts=attempts,
        )

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
        """Many calls as one provider batch (see `batch.chat_batch`); replies in input order."""
        return await batch.chat_batch(
            self, requests, model=model or self.cfg.model, temperature=temperature, max_tokens=max_tokens,
            stage=stage, round=round, poll_s=poll_s, timeout_s=timeout_s,
        )

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

    async def _closing(self, coro: Awaitable[T]) -> T:
        try:
            return await coro
        finally:
            self.log.flush()
            await self._close_sdk()

    def run(self, coros: Sequence[Awaitable[T]], progress: ProgressReporter | None = None) -> list[T]:
        """Run coroutines concurrently (the semaphore caps calls in flight); results in order.
        `progress` is told the total and each completion (the caller decides how to show it)."""
        return asyncio.run(self._gather(list(coros), progress))

    async def _gather(self, coros: list[Awaitable[T]], progress: ProgressReporter | None) -> list[T]:
        results: list[Any] = [None] * len(coros)

        async def one(i: int, c: Awaitable[T]) -> None:
            results[i] = await c

        tasks = [asyncio.ensure_future(one(i, c)) for i, c in enumerate(coros)]
        try:
            if progress is not None:
                progress.start(len(tasks))
            try:
                for fut in asyncio.as_completed(tasks):
                    await fut
                    if progress is not None:
                        progress.advance()
            finally:
                if progress is not None:
                    progress.stop()
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
            self.log.flush()
            await self._close_sdk()
        return results

    def ledger(self) -> dict[str, Any]:
        """Totals overall and per stage/round, plus the models that had no price (costed at 0)."""
        out = self.log.ledger()
        out["unpriced_models"] = sorted(m for m in self.log.models_answered() if m and self.price(m) is None)
        return out

    def close(self) -> None:
        self.log.close()
