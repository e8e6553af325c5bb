"""Request batching for `llamaduo serve`, and the generator it drives.

An asyncio queue gathers up to `max_batch` requests, groups them by sampling parameters, and
runs one batched `generate` per group in a single worker thread (the model is not shared
between threads). Requests that arrive while a batch runs form the next batch; the extra
`batch_wait_ms` gathering wait applies only under concurrent load, so a lone client pays no
batching delay.
"""

import asyncio
import contextlib
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from llamaduo.chat_api import ChatRequest, Choice
from llamaduo.config import InferConfig
from llamaduo.constraint import ConstraintFactory
from llamaduo.data import Message

# generator(prompts, sampling, seed) -> one output per prompt × sample, in that order; each output
# has `.text` and optionally `.finish_reason`, `.new_tokens`, `.prompt_tokens`. A prompt is its
# messages or its rendered text; a generator that decodes under constraints also takes
# `constraints=` (one `ConstraintFactory` or None per prompt), passed only when one is set.
Generator = Callable[..., Sequence[Any]]


# ------------------------------------------------------------------------ batching
@dataclass
class _Job:
    request: ChatRequest
    future: asyncio.Future
    arrived: float
    abandoned: bool = False


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    largest: int = 0


class Batcher:
    """Gathers concurrent requests and runs one `generator` call per group of equal sampling params."""

    def __init__(self, generator: Generator, max_batch: int, wait_s: float):
        self.generator = generator
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.stats = BatchStats()
        # One thread: generation is serialised on the model, the event loop stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamaduo-generate")
        self._task: asyncio.Task | None = None
        self._last_size = 1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, request: ChatRequest) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(request, loop.create_future(), loop.time())
        self.queue.put_nowait(job)
        return job

    async def _gather(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        while len(batch) < self.max_batch and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        # Wait for company only under concurrent load (the last batch had more than one request):
        # a lone client is never delayed. The wait counts from the first request's arrival.
        if self._last_size > 1:
            deadline = batch[0].arrived + self.wait_s
            while len(batch) < self.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except (asyncio.TimeoutError, TimeoutError):
                    break
        self._last_size = len(batch)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [j for j in await self._gather() if not j.abandoned and not j.future.done()]
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                groups.setdefault(job.request.group_key, []).append(job)
            for jobs in groups.values():
                jobs = [j for j in jobs if not j.abandoned and not j.future.done()]
                if not jobs:
                    continue
                req = jobs[0].request
                prompts = [(f"req-{i}", j.request.prompt or j.request.messages) for i, j in enumerate(jobs)]
                factories = [j.request.constraint for j in jobs]
                # Constrained rows share the batch; only then does the generator get `constraints`.
                extra = {"constraints": factories} if any(f is not None for f in factories) else {}
                sampling = req.sampling.model_copy(update={"batch_size": len(jobs)})
                self.stats.batches += 1
                self.stats.requests += len(jobs)
                self.stats.largest = max(self.stats.largest, len(jobs))
                try:
                    call = functools.partial(self.generator, prompts, sampling, req.seed, **extra)
                    outs = await loop.run_in_executor(self._executor, call)
                    outs = list(outs)
                    if len(outs) != len(jobs) * req.n:
                        raise RuntimeError(f"generator returned {len(outs)} outputs for {len(jobs)}×{req.n}")
                except Exception as e:  # each waiting request decides: fallback or error
                    for j in jobs:
                        if not j.future.done() and not j.abandoned:
                            j.future.set_exception(e)
                    continue
                for i, j in enumerate(jobs):
                    if not j.future.done() and not j.abandoned:
                        j.future.set_result(outs[i * req.n : (i + 1) * req.n])


# ------------------------------------------------------------------ local model
def local_generator(model: Any, tokenizer: Any) -> Generator:
    """`generate` over a loaded model, as the server's generator (adds prompt token counts)."""
    from llamaduo import infer

    def run(prompts: list[tuple[str, list[Message] | str]], sampling: InferConfig, seed: int,
            constraints: list[ConstraintFactory | None] | None = None) -> list[Choice]:
        outs = infer.generate(model, tokenizer, prompts, sampling, seed=seed, constraints=constraints)
        lengths = [len(infer.prompt_ids(tokenizer, m)) for _, m in prompts]
        k = sampling.num_samples
        return [
            Choice(
                text=o.text,
                finish_reason=o.finish_reason or "stop",
                completion_tokens=int(o.new_tokens or 0),
                prompt_tokens=lengths[i // k],
            )
            for i, o in enumerate(outs)
        ]

    return run
