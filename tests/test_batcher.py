"""Request batching in the server: concurrent requests share a generate call, sampling never mixes."""

from __future__ import annotations

import asyncio
import time

import openai

from llamaduo.config import ServeConfig
from tests.tiny_server import QUESTIONS, client, direct, gen, running, tiny  # noqa: F401


def test_concurrent_requests_are_batched_without_changing_greedy_answers(tiny, gen):  # noqa: F811
    calls: list[tuple[int, float]] = []

    def recording(prompts, sampling, seed):
        calls.append((len(prompts), sampling.temperature))
        return gen(prompts, sampling, seed)

    async def ask_all(srv) -> list[str]:
        c = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        rs = await asyncio.gather(
            *[c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": q}]) for q in QUESTIONS * 2]
        )
        await c.close()
        return [r.choices[0].message.content for r in rs]

    with running(recording, ServeConfig(max_batch=8, batch_wait_ms=200)) as srv:
        answers = asyncio.run(ask_all(srv))
    expected = [direct(tiny, q) for q in QUESTIONS * 2]
    assert answers == expected and all(expected) and len(set(expected)) > 1
    assert sum(n for n, _ in calls) == 8 and max(n for n, _ in calls) > 1


def test_requests_with_different_sampling_are_generated_in_separate_groups(gen):  # noqa: F811
    calls: list[tuple[int, float, int]] = []

    def recording(prompts, sampling, seed):
        calls.append((len(prompts), sampling.temperature, sampling.num_samples))
        return gen(prompts, sampling, seed)

    async def ask(srv):
        c = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        rs = await asyncio.gather(
            c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "a"}], temperature=0),
            c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "b"}], temperature=0),
            c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "c"}], temperature=0.7, n=3),
        )
        await c.close()
        return rs

    with running(recording, ServeConfig(batch_wait_ms=200)) as srv:
        rs = asyncio.run(ask(srv))
    # Arrival timing decides how the two greedy requests are grouped; sampling never mixes.
    assert sum(n for n, t, _ in calls if t == 0.0) == 2
    assert [(n, k) for n, t, k in calls if t == 0.7] == [(1, 3)]
    assert [len(r.choices) for r in rs] == [1, 1, 3] and [c.index for c in rs[2].choices] == [0, 1, 2]


def test_a_lone_client_does_not_wait_for_a_batch_to_fill(gen):  # noqa: F811
    with running(gen, ServeConfig(max_batch=8, batch_wait_ms=3000)) as srv:
        c = client(srv)
        t0 = time.monotonic()
        for _ in range(3):
            c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "Anna"}])
        took = time.monotonic() - t0
    assert took < 3.0  # three requests, each far quicker than one 3 s gathering wait
