"""Continuous batching for `llamaduo serve`: one generation thread, a token stream per request.

Requests go into an inbox; the generation thread admits waiting requests between decode steps
(their prefill interleaved with the others' decoding, `rowbatch.RowBatch.add`), runs one step
for every live row, and hands the new text that is due (a stream's first and last tokens at once,
the others at most every `serve.stream_interval_ms`) to the event loop in one `loop.call_soon_threadsafe`,
where each request's `Stream` queues it for its route. A request
leaves the batch when its rows finish, or at the next step after its `Stream` is cancelled (its
client went away). Rows of different requests share every step whatever their sampling settings,
constraints or adapters.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from llamaduo.chat_api import ChatRequest, Choice
from llamaduo.config.serving import ServeConfig
from llamaduo.rowbatch import Event, RowBatch

log = logging.getLogger("llamaduo.scheduler")

PREFILL_TOKENS = 1024  # prompt tokens prefilled between two decode steps (at least one request; cached ones free)
# The hand-over gap is `serve.stream_interval_ms`: each chunk costs the event loop and the client a
# wake-up and a write, and the loop then holds the interpreter lock the generation thread needs for
# its next step (tiny model: one hand-over per token took a quarter of that thread's time). First
# tokens, last tokens and errors go out at once, so time-to-first-token and the end of an answer are
# not delayed; whoever is due then, or within half a gap, rides along in the same hand-over.


class StreamClosed(Exception):
    """The request was cancelled (its client went away, or the fallback took over)."""


class Stream:
    """One request's answer as it is produced; lives on the event loop."""

    def __init__(self, request: ChatRequest):
        self.request = request
        self.queue: asyncio.Queue[list[Event] | BaseException] = asyncio.Queue()
        self.cancelled = False
        self.watcher: asyncio.Task | None = None  # the route's disconnect watch, while it streams
        self.deadline: float | None = None  # time.monotonic() past which the request is cut off (serve.request_timeout_s)
        self.handed_at: float | None = None  # when the generation thread last handed this stream events (None: never)
        self.open = request.n
        want = getattr(request, "logprobs", None) is not None
        self.choices = [Choice(text="", logprobs=[] if want else None) for _ in range(request.n)]

    def put(self, events: list[Event] | BaseException) -> None:
        self.queue.put_nowait(events)

    async def next(self) -> list[Event] | None:
        """The next events of this request; None once every choice has finished. Raises a generation error."""
        if self.open == 0:
            return None
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        for e in item:
            c = self.choices[e.index]
            c.text += e.text
            c.completion_tokens, c.prompt_tokens = e.completion_tokens, e.prompt_tokens
            c.tokens += e.tokens
            if e.logprobs and c.logprobs is not None:
                c.logprobs += e.logprobs
            if e.finish_reason is not None:
                c.finish_reason = e.finish_reason
                self.open -= 1
        return item

    async def result(self) -> list[Choice]:
        while await self.next() is not None:
            pass
        return self.choices

    def cancel(self) -> None:
        """Leave the batch at the next step; whoever still waits on this stream gets `StreamClosed`."""
        if not self.cancelled:
            self.cancelled = True
            self.queue.put_nowait(StreamClosed())


@dataclass
class EngineStats:
    batches: int = 0  # decode steps run
    requests: int = 0
    largest: int = 0  # most rows in one step


class Scheduler:
    """Generates every request's tokens in one continuously refilled batch (one thread owns the model)."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int, handover_gap_s: float | None = None,
                 prefix_cache_bytes: int | None = None):
        """`handover_gap_s`: `serve.stream_interval_ms` in seconds (None: its default); `prefix_cache_bytes`
        as `RowBatch`'s."""
        if handover_gap_s is None:
            handover_gap_s = ServeConfig.model_fields["stream_interval_ms"].default / 1000
        self.batch = RowBatch(model, tokenizer, prefix_cache_bytes)
        self.max_batch = max_batch
        self.handover_gap_s = handover_gap_s  # 0: every step's tokens go out as decoded
        self.stats = EngineStats()
        self._inbox: queue.Queue[Stream | None] = queue.Queue()
        self._waiting: collections.deque[Stream] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._pending: list[tuple[Stream, list[Event] | BaseException]] | None = None  # not yet taken by the loop
        self._pending_lock = threading.Lock()
        self._scheduled = False  # a hand-over is queued on the loop
        self._held: dict[Stream, list[list[Event] | BaseException]] = {}  # not yet due (generation thread only)
        self._urgent: set[Stream] = set()  # held streams whose events go out at once

    @property
    def queued(self) -> int:
        return self._inbox.qsize() + len(self._waiting)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="llamaduo-generate", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._closing = True
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def submit(self, request: ChatRequest) -> Stream:
        stream = Stream(request)
        self._inbox.put(stream)
        return stream

    # ------------------------------------------------------------- generation thread
    def _deliver(self, groups: dict[Stream, list[Event]] | list[tuple[Stream, BaseException]]) -> None:
        """Hand the events that are due to the event loop (see `handover_gap_s`); the rest wait on this
        thread for a later step. Called after every step, so waiting events go out once due. While
        the loop has not yet taken the previous hand-over, due events ride along with it."""
        if self._loop is None:
            return
        for stream, payload in groups.items() if isinstance(groups, dict) else groups:
            self._held.setdefault(stream, []).append(payload)
            if isinstance(payload, BaseException) or stream.handed_at is None or any(
                    e.finish_reason is not None for e in payload):
                self._urgent.add(stream)
        if not self._held:
            return
        now = time.monotonic()
        if not self._urgent and all(now - s.handed_at < self.handover_gap_s for s in self._held if s.handed_at is not None):
            return
        moved = []
        for stream in list(self._held):
            if stream in self._urgent or (stream.handed_at is not None and now - stream.handed_at >= self.handover_gap_s / 2):
                moved += [(stream, payload) for payload in self._held.pop(stream)]
                stream.handed_at = now
        self._urgent.clear()
        with self._pending_lock:
            self._pending = moved if self._pending is None else self._pending + moved
            if self._scheduled:
                return  # rides along with the hand-over the loop has not taken yet
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._put_pending)

    def _put_pending(self) -> None:
        with self._pending_lock:
            items, self._pending, self._scheduled = self._pending or [], None, False
        merged: dict[Stream, list[Event]] = {}
        for stream, payload in items:
            if isinstance(payload, BaseException):  # after the events before it
                if stream in merged:
                    stream.put(merged.pop(stream))
                stream.put(payload)
            else:
                merged.setdefault(stream, []).extend(payload)
        for stream, events in merged.items():
            stream.put(events)

    def _pull(self) -> None:
        """Move new requests from the inbox to the waiting line; block while there is nothing to do."""
        block = not len(self.batch) and not self._waiting
        while True:
            try:
                item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if item is not None:
                self._waiting.append(item)

    def _admit(self) -> None:
        budget = PREFILL_TOKENS
        while self._waiting and budget > 0:
            stream = self._waiting[0]
            if stream.cancelled:
                self._waiting.popleft()
                continue
            if len(self.batch) and len(self.batch) + stream.request.n > self.max_batch:
                return
            self._waiting.popleft()
            self.stats.requests += 1
            try:
                events = self.batch.add(stream, stream.request)
            except Exception as e:  # this request fails (fallback or 500); the others go on
                log.exception("prefill failed")
                self.batch.drop(stream)
                self._deliver([(stream, e)])
                continue
            budget -= self.batch.prefilled + 1  # a prefix from the cache costs no prefill time
            # Its first tokens go out now, not after the next prefill or step: requests arriving together
            # (clients that started together) would otherwise all wait for the last one's prefill.
            if events:
                self._deliver({stream: events})

    def _run(self) -> None:
        while not self._closing:
            self._pull()
            for stream in {id(r.key): r.key for r in self.batch.rows if r.key.cancelled}.values():
                self.batch.drop(stream)
                self._held.pop(stream, None)
            self._admit()
            groups: dict[Stream, list[Event]] = {}
            if len(self.batch):
                self.stats.batches += 1
                self.stats.largest = max(self.stats.largest, len(self.batch))
                try:
                    for e in self.batch.step():
                        groups.setdefault(e.key, []).append(e)
                except Exception as e:
                    log.exception("decode step failed")
                    self._deliver([(s, e) for s in self.batch.clear()])
            if not len(self.batch):  # nothing will step again soon: whatever waits goes out now
                self._urgent.update(self._held)
            self._deliver(groups)
