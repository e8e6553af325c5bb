"""Shadow evaluation: a sampled share of live requests also goes to the service LLM, off the
request path, and the (request, local answer, service answer) triple is judged.

`offer` runs on the server's event loop and costs a random draw and a `put_nowait`: it never
waits. A full queue drops the work and counts it (`dropped{reason="queue_full"}`). A worker
thread takes batches from the queue, stores them redacted in the monitoring store, asks the
service LLM for its answer (`chat_text`, stage "shadow") and judges each local answer against it
with the run's protocol (`judge.judge_predictions`: the service's answer is the reference; the
Batch API when `service.use_batch`), all within `serve.shadow_max_usd`. After each batch the drift
monitor closes the windows that are complete.

The worker's client must be its own `ServiceClient`, not the one the server's event loop uses
for fallback: a client's SDK connection belongs to one event loop.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llamaduo.artifacts import Completion
from llamaduo.capture import default_redact
from llamaduo.config import Config
from llamaduo.data import Example, Message
from llamaduo.monitor_store import MonitorStore

if TYPE_CHECKING:
    from llamaduo.drift import DriftMonitor
    from llamaduo.service import Client

log = logging.getLogger("llamaduo.shadow")

SHADOW_STAGES = ("shadow", "shadow_judge")  # call-log stages whose spend is the shadow budget's

# The one place stored text is redacted (capture's e-mail and phone masks today).
redact: Callable[[str], str] = default_redact


def _request_parts(request: Any) -> tuple[list[dict[str, str]], int | None]:
    if hasattr(request, "messages") and hasattr(request, "sampling"):
        return [{"role": m.role, "content": m.content} for m in request.messages], request.sampling.max_new_tokens
    return [dict(m) for m in request], None


@dataclass
class ShadowItem:
    messages: list[dict[str, str]]
    local_answer: str
    model: str | None
    ts: float
    latency_ms: float | None = None
    max_tokens: int | None = None
    service_answer: str | None = None  # known already when the service answered the client (drift)


class ShadowSender:
    """Samples requests, queues them without blocking, and answers + judges them in a worker thread."""

    def __init__(
        self,
        cfg: Config,
        client: Client,
        store: MonitorStore,
        *,
        rate: float | None = None,
        max_queue: int | None = None,
        rng: random.Random | None = None,
        drift: DriftMonitor | None = None,
        clock: Callable[[], float] = time.time,
    ):
        sv = cfg.serve
        self.cfg = cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"max_test_prompts": None})})
        self.client, self.store, self.drift, self.clock = client, store, drift, clock
        self.rate = sv.shadow_rate if rate is None else rate
        self.max_usd = sv.shadow_max_usd
        self.batch = sv.shadow_batch
        self.service_model = cfg.service.model
        self.rng = rng or random.Random(cfg.seed)
        self.queue: queue.Queue[ShadowItem] = queue.Queue(maxsize=sv.shadow_queue if max_queue is None else max_queue)
        self.counts: Counter[str] = Counter()  # offered, sampled, sent, judged, unjudged, failed, dropped:<reason>
        self.spend_usd = store.spend_total()
        self.probing = 0  # local answers still being generated for `probe`
        # Shadow work yields to live requests: the server sets this to "requests in flight".
        self.busy: Callable[[], bool] = lambda: False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the request path (event loop): never waits
    def sample(self) -> bool:
        self.counts["offered"] += 1
        hit = self.rate > 0 and self.rng.random() < self.rate
        self.counts["sampled"] += hit
        return hit

    def enqueue(self, messages: list[dict[str, str]], local_answer: str, *, model: str | None = None,
                latency_ms: float | None = None, max_tokens: int | None = None,
                service_answer: str | None = None) -> bool:
        try:
            self.queue.put_nowait(ShadowItem(messages, local_answer, model, self.clock(), latency_ms, max_tokens,
                                             service_answer))
            return True
        except queue.Full:
            self.counts["dropped:queue_full"] += 1
            return False

    def offer(self, request: Any, local_answer: str, **kw: Any) -> bool:
        """Shadow this request (a `chat_api.ChatRequest`, or its messages as dicts) with probability
        `rate`; True when it was queued."""
        if not self.sample():
            return False
        messages, max_tokens = _request_parts(request)
        return self.enqueue(messages, local_answer, max_tokens=kw.pop("max_tokens", max_tokens), **kw)

    def probe(self, future: Any, request: Any, service_answer: str, model: str | None = None) -> None:
        """Queue the local answer a (sampled) request gets once `future` (its batcher job) is done,
        with the service answer the client was given; used while drifted, so recovery can be seen."""
        messages, max_tokens = _request_parts(request)
        self.probing += 1

        def done(f: Any) -> None:
            self.probing -= 1  # on the event loop, like the increment
            if f.cancelled() or f.exception() is not None or not f.result():
                return
            self.enqueue(messages, str(getattr(f.result()[0], "text", f.result()[0])), model=model,
                         max_tokens=max_tokens, service_answer=service_answer)

        future.add_done_callback(done)

    def dropped(self) -> dict[str, int]:
        return {k.split(":", 1)[1]: v for k, v in self.counts.items() if k.startswith("dropped:")}

    # ---- lifecycle
    def start(self) -> ShadowSender:
        # The SDK is imported here, before the worker exists: a module a thread is still importing
        # shows up half-initialised to code that peeks into sys.modules (the openai SDK does for httpx).
        for sdk in ("httpx", "openai"):
            with contextlib.suppress(ImportError):
                importlib.import_module(sdk)
        self._thread = threading.Thread(target=self._work, name="llamaduo-shadow", daemon=True)
        self._thread.start()
        return self

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until every queued item is answered and judged (tests, benchmarks, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self.queue.unfinished_tasks or self.probing:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    # ---- the worker thread
    def _wait_idle(self) -> None:
        """Shadow work runs in the server's idle time, so it does not compete with generation for the
        CPU (or the interpreter lock); under sustained full load the queue fills and drops, counted."""
        while self.busy() and not self._stop.is_set():
            time.sleep(0.005)

    def _work(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # a lower CPU priority where the OS has one per thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while not self._stop.is_set():
            try:
                items = [self.queue.get(timeout=0.05)]
            except queue.Empty:
                continue
            while len(items) < self.batch:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._wait_idle()
                self.process(items)
            except Exception:  # the worker must outlive any one bad batch
                log.exception("shadow batch failed")
                self.counts["failed"] += len(items)
            finally:
                for _ in items:
                    self.queue.task_done()

    def over_budget(self) -> bool:
        return self.max_usd is not None and self.spend_usd >= self.max_usd

    def process(self, items: list[ShadowItem]) -> None:
        """Store, answer and judge one batch (called by the worker; callable directly in tests)."""
        if self.over_budget():
            self.counts["dropped:budget"] += len(items)
            return
        ids = [self.store.add_pair(
            [{"role": m["role"], "content": redact(m["content"])} for m in it.messages], redact(it.local_answer),
            model=it.model, ts=it.ts, local_latency_ms=it.latency_ms, max_tokens=it.max_tokens,
            service_answer=redact(it.service_answer) if it.service_answer is not None else None,
            service_model=self.service_model if it.service_answer is not None else None,
        ) for it in items]
        todo = [(pid, it) for pid, it in zip(ids, items, strict=True) if it.service_answer is None]
        if todo:
            self._answer(todo)
        self._record_spend()
        if not self.over_budget():
            self._wait_idle()
            self._judge(ids)
            self._record_spend()
        if self.drift is not None:
            self.drift.update()

    def _answer(self, todo: list[tuple[int, ShadowItem]]) -> None:
        from llamaduo.service import BudgetExceeded

        async def one(it: ShadowItem) -> tuple[Any, float]:
            t0 = time.monotonic()
            reply = await self.client.chat_text(it.messages, model=self.service_model, temperature=0.0,
                                                max_tokens=it.max_tokens or self.cfg.infer.max_new_tokens, stage="shadow")
            return reply, (time.monotonic() - t0) * 1000

        try:
            results = self.client.run([one(it) for _, it in todo])
        except BudgetExceeded as e:
            for pid, _ in todo:
                self.store.set_answer(pid, None, self.service_model, None, f"budget: {e}")
            self.counts["dropped:budget"] += len(todo)
            return
        for (pid, _), (reply, ms) in zip(todo, results, strict=True):
            self.counts["sent"] += 1
            if reply.ok:
                self.store.set_answer(pid, redact(reply.raw or ""), self.service_model, ms)
            else:
                self.counts["failed"] += 1
                self.store.set_answer(pid, None, self.service_model, ms, reply.error or "no answer")

    def _judge(self, ids: list[int]) -> None:
        from llamaduo.judge import judge_predictions

        wanted = set(ids)
        pairs = [p for p in self.store.pairs(status="answered") if p.id in wanted]
        if not pairs:
            return
        examples, preds = [], []
        for p in pairs:
            msgs = [Message(role=m["role"], content=m["content"]) for m in p.messages]  # type: ignore[arg-type]
            examples.append(Example(id=f"shadow-{p.id}", messages=[*msgs, Message(role="assistant",
                                                                                 content=p.service_answer or "")]))
            preds.append(Completion(prompt_id=f"shadow-{p.id}", sample_index=0, text=p.local_answer))
        try:
            rows = judge_predictions(self.cfg, self.client, examples, preds, round=None, stage="shadow_judge")
        except Exception as e:  # budget spent, service down: the pairs stay stored, unjudged
            log.warning("shadow judging failed: %s: %s", type(e).__name__, e)
            self.counts["unjudged"] += len(pairs)
            return
        metric = self.cfg.judge.pass_rule.judged().metric
        for p in pairs:
            mine = [j for j in rows if j.prompt_id == f"shadow-{p.id}" and j.ok]
            if not mine:
                errs = [j.error for j in rows if j.prompt_id == f"shadow-{p.id}" and j.error]
                self.store.set_judgment(p.id, None, None, None, {}, errs[0] if errs else "no valid judgment")
                self.counts["unjudged"] += 1
                continue
            sim = sum(j.similarity or 0 for j in mine) / len(mine)
            prec = sum(j.precision or 0 for j in mine) / len(mine)
            reasons = {"similarity": mine[0].similarity_reason or "", "precision": mine[0].precision_reason or ""}
            self.store.set_judgment(p.id, round(sim, 4), round(prec, 4), round(sim if metric == "similarity" else prec, 4),
                                    reasons)
            self.counts["judged"] += 1

    def _record_spend(self) -> None:
        """Shadow spend as the call log has it (stages shadow and shadow_judge), kept in the monitor store."""
        try:
            by_stage = self.client.ledger().get("by_stage", {})
        except Exception:  # noqa: BLE001  - a client without a call log: spend unknown, budget unenforced
            return
        for stage in SHADOW_STAGES:
            if stage in by_stage:
                self.store.set_spend(stage, float(by_stage[stage].get("usd", 0.0)))
        self.spend_usd = self.store.spend_total()


def for_run(cfg: Config, run_dir: Any) -> tuple[ShadowSender, DriftMonitor]:
    """The shadow sender and drift monitor of a served run directory (its stores, client and tracker)."""
    from llamaduo.drift import DriftMonitor
    from llamaduo.errors import UserError
    from llamaduo.service import ServiceClient
    from llamaduo.store import RunStore
    from llamaduo.tracking import NullTracker, make_tracker

    store = RunStore(run_dir)
    if not store.exists():
        raise UserError(f"serve.shadow_rate needs a run directory (its judge protocol and monitoring store); "
                        f"{run_dir} is not one")
    target = None
    rule = cfg.judge.pass_rule.judged()  # judge scores only
    if rule.relative_to_service is not None and store.scores_path("baseline").exists():
        base = store.read_scores("baseline").stat(rule.metric, rule.statistic)
        target = rule.relative_to_service * base if base is not None else None
    try:
        tracker = make_tracker(cfg, store)
    except Exception as e:  # tracking is a side channel
        log.warning("tracking not available for monitoring windows: %s: %s", type(e).__name__, e)
        tracker = NullTracker()
    monitor_store = MonitorStore(store.monitor_db)
    drift = DriftMonitor(cfg, monitor_store, tracker=tracker, target=target)
    # Its own client: the server's event loop has the fallback's (an SDK connection is per loop).
    client = ServiceClient(cfg.service, db_path=store.service_db)
    return ShadowSender(cfg, client, monitor_store, drift=drift), drift
