"""Throughput of the service client against a rate-limited endpoint, next to a batch-and-sleep scheduler.

    python benchmarks/service_throughput.py --requests 2000 --rpm 1200 --latency-ms 200

Both sides talk to a fresh loopback simulator that enforces `--rpm` over a sliding 60 s window
(429 with Retry-After above it) and answers after `--latency-ms`.

- ours: `ServiceClient` with `service.rpm` set to the limit, driven through `client.run`.
- reference: the scheduler of the original LlamaDuo code, re-implemented from its description:
  4 workers; batches of floor((rpm/60) / (1/20) / workers) jobs launched together; after a
  batch, sleep 60 / batch seconds; a request that gets a 429 is not retried (it fails).

Achieved rate = successful requests ÷ wall time of the whole run. The last line is
machine-readable: `ratio_to_limit=... failed=... reference_ratio=... reference_failed=...`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from llamaduo.config import ServiceConfig
from llamaduo.demo.simulator import SimulatedService
from llamaduo.progress import Bar
from llamaduo.service import ServiceClient

REFERENCE_WORKERS = 4


@dataclass
class Side:
    name: str
    requests: int
    ok: int
    failed: int
    got_429: int
    wall_s: float

    @property
    def rate(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0


def answer(request: dict) -> str:
    return "ok"


def run_ours(n: int, rpm: int, latency_s: float, concurrency: int, progress: bool) -> Side:
    with tempfile.TemporaryDirectory() as tmp, SimulatedService(answer, latency_s=latency_s, rpm_limit=rpm) as svc:
        cfg = ServiceConfig(
            base_url=svc.base_url, model="simulated", rpm=rpm, concurrency=concurrency,
            timeout_s=30.0, max_retries=5, prices={},
        )
        db = Path(tmp) / "service.sqlite"
        client = ServiceClient(cfg, db_path=db, api_key="not-needed")
        msgs = [{"role": "user", "content": "Say ok."}]
        # Distinct sample indices: every call is a real request, none is a cache hit.
        coros = [client.chat_text(msgs, max_tokens=8, sample_index=i, stage="bench") for i in range(n)]
        t0 = time.monotonic()
        replies = client.run(coros, progress=Bar("ours") if progress else None)
        wall = time.monotonic() - t0
        client.close()
        conn = sqlite3.connect(db)
        got_429 = conn.execute("SELECT COUNT(*) FROM calls WHERE status='http_429'").fetchone()[0]
        conn.close()
    ok = sum(r.ok for r in replies)
    return Side("ours", n, ok, n - ok, got_429, wall)


def reference_batch_size(rpm: int, workers: int = REFERENCE_WORKERS) -> int:
    return max(1, math.floor((rpm / 60) / (1 / 20) / workers))


async def _reference(base_url: str, n: int, rpm: int) -> tuple[list[int], float]:
    batch = reference_batch_size(rpm)
    pause = 60 / batch
    body = {"model": "simulated", "messages": [{"role": "user", "content": "Say ok."}], "max_tokens": 8}
    limits = httpx.Limits(max_connections=batch, max_keepalive_connections=batch)
    codes: list[int] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0, limits=limits) as http:

        async def job() -> int:
            try:
                return (await http.post("/chat/completions", json=body)).status_code
            except httpx.HTTPError:
                return 0

        t0 = time.monotonic()
        for start in range(0, n, batch):
            codes += await asyncio.gather(*(job() for _ in range(min(batch, n - start))))
            if start + batch < n:
                await asyncio.sleep(pause)
        return codes, time.monotonic() - t0


def run_reference(n: int, rpm: int, latency_s: float) -> Side:
    with SimulatedService(answer, latency_s=latency_s, rpm_limit=rpm) as svc:
        codes, wall = asyncio.run(_reference(svc.base_url, n, rpm))
    ok = sum(c == 200 for c in codes)
    return Side("reference", n, ok, n - ok, sum(c == 429 for c in codes), wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rpm", type=int, default=1200, help="the endpoint's limit, also given to our client")
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--concurrency", type=int, default=ServiceConfig().concurrency)
    ap.add_argument("--progress", action="store_true", help="show our client's progress bar")
    args = ap.parse_args()
    latency = args.latency_ms / 1000
    limit = args.rpm / 60

    ours = run_ours(args.requests, args.rpm, latency, args.concurrency, args.progress)
    ref = run_reference(args.requests, args.rpm, latency)

    print(f"limit {args.rpm} rpm = {limit:.2f} req/s, latency {args.latency_ms:g} ms, {args.requests} requests; "
          f"reference batch {reference_batch_size(args.rpm)} every {60 / reference_batch_size(args.rpm):.2f} s")
    print(f"{'side':<10} {'ok':>6} {'failed':>7} {'429s':>6} {'wall s':>8} {'ok req/s':>9} {'÷ limit':>8}")
    for s in (ours, ref):
        print(f"{s.name:<10} {s.ok:>6} {s.failed:>7} {s.got_429:>6} {s.wall_s:>8.1f} {s.rate:>9.2f} {s.rate / limit:>8.3f}")
    print(f"ratio_to_limit={ours.rate / limit:.3f} failed={ours.failed} "
          f"reference_ratio={ref.rate / limit:.3f} reference_failed={ref.failed}")


if __name__ == "__main__":
    main()
