"""Throughput of the service client against a rate-limited endpoint, next to a batch-and-sleep scheduler.

    python benchmarks/service_throughput.py --requests 20000 --rpm 10000 --tpm 2000000 --latency lognormal:1.0 --faults 0.02
    python benchmarks/service_throughput.py --requests 2000 --rpm 1200 --latency-ms 200

Both sides talk to a fresh loopback simulator, run in a process of its own, that enforces
`--rpm` (and `--tpm`) over a sliding 60 s window (429 with Retry-After above either), answers
after `--latency-ms` or a latency drawn from `--latency` (`lognormal:MEDIAN_S`: p99 = 8 × the
median), and refuses a share `--faults` of requests at once, half with a 429 with Retry-After,
half with a 5xx.

- ours: `ServiceClient` with `service.rpm`/`service.tpm` set to the limits, driven through `client.run`.
- reference: the scheduler of the original LlamaDuo code, re-implemented from its description:
  4 workers; batches of floor((rpm/60) / (1/20) / workers) jobs launched together; after a
  batch, sleep 60 / batch seconds; a request that gets a 429 or 5xx is not retried (it fails).
  It sends through the same HTTP transport as ours.

Requests: with `--tpm`, a seeded shuffle of short judge-like requests (~100 prompt tokens,
max_tokens 64) and long synthesis-like ones (~260 prompt tokens, max_tokens 512), the share of
long ones chosen so that the token limit allows 95 % of the request limit: the token limit binds
on average and the request limit during runs of short requests. A request counts its prompt plus
its max_tokens against the token limit (OpenAI's rule). The binding limit is the lower of
`--rpm` and `--tpm` ÷ the mean tokens a request counts. Without `--tpm`, every request is the
same short one.

Achieved rate = successful requests ÷ the span between the first and the last successful
request's arrival at the simulator: the rate that the limit is about. (A wall-time rate would
also count the last replies' latency tail, up to tens of seconds at a lognormal p99 of 8 s; it
is printed too.) cpu_ms_per_call = this process's CPU time (`time.process_time`, the client side
only: the simulator runs in its own process) from building the calls to closing the client, per
request. The last line is machine-readable:
`ratio_to_limit=... failed=... cpu_ms_per_call=... reference_ratio=... reference_failed=...`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import math
import pstats
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llamaduo.config import ServiceConfig
from llamaduo.demo.faults import Latency, rate_limit_tokens
from llamaduo.demo.sim_process import SimulatorProcess
from llamaduo.progress import Bar
from llamaduo.service import ServiceClient
from llamaduo.service.retry import ServiceFault
from llamaduo.service.transport import LeanHTTP, openai_headers

REFERENCE_WORKERS = 4
TPM_SHARE = 0.95  # the token limit allows this share of the request limit for the mix
SHORT = ("Judge whether the candidate answer matches the reference answer and give a score. " * 4, 64)
LONG = ("Write five new instruction and response pairs about the topic below, in JSON. " * 13, 512)
PLAIN = ("Say ok.", 8)


@dataclass
class Side:
    name: str
    requests: int
    ok: int
    failed: int
    got_429: int
    wall_s: float
    span_s: float
    stats: dict
    cpu_s: float = 0.0
    waits: dict | None = None

    @property
    def rate_per_min(self) -> float:
        return 60 * (self.ok - 1) / self.span_s if self.span_s > 0 else 0.0

    @property
    def wall_rate_per_min(self) -> float:
        return 60 * self.ok / self.wall_s if self.wall_s > 0 else 0.0


def answer(request: dict) -> str:
    """About 60 % of max_tokens of text (module level: the simulator process imports it)."""
    words = max(1, int(request.get("max_tokens") or 8) * 4 * 6 // 10 // 5)
    return "word " * words


def body_tokens(content: str, max_tokens: int) -> int:
    return rate_limit_tokens({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})


def request_mix(n: int, rpm: int, tpm: int | None, seed: int) -> tuple[list[tuple[str, int]], str]:
    """The requests (prompt, max_tokens) in send order, and a line saying what they are."""
    if tpm is None:
        return [PLAIN] * n, f"{n} identical requests ({body_tokens(*PLAIN)} tokens each)"
    short, long = body_tokens(*SHORT), body_tokens(*LONG)
    target = tpm / (TPM_SHARE * rpm)  # mean tokens a request may count for tpm to allow 95 % of rpm
    share = min(1.0, max(0.0, (target - short) / (long - short)))
    n_long = round(n * share)
    mix = [LONG] * n_long + [SHORT] * (n - n_long)
    random.Random(seed).shuffle(mix)
    return mix, (f"{n - n_long} short requests ({short} tokens counted: prompt + max_tokens {SHORT[1]}), "
                 f"{n_long} long ({long} tokens: max_tokens {LONG[1]}), shuffled")


def binding_limit(mix: list[tuple[str, int]], rpm: int, tpm: int | None) -> tuple[float, str]:
    """Requests per minute the limits allow these requests, and how that was derived."""
    if tpm is None:
        return float(rpm), f"binding limit = rpm = {rpm} requests/min"
    mean = sum(body_tokens(*r) for r in mix) / len(mix)
    by_tokens = tpm / mean
    which = "tpm" if by_tokens < rpm else "rpm"
    return min(rpm, by_tokens), (f"binding limit = min(rpm {rpm}, tpm {tpm} / {mean:.1f} mean tokens a request = "
                                 f"{by_tokens:.0f}) = {min(rpm, by_tokens):.0f} requests/min ({which})")


def simulator(args: argparse.Namespace, latency: Latency) -> SimulatorProcess:
    return SimulatorProcess(answer, latency=latency, rpm_limit=args.rpm, tpm_limit=args.tpm, fault_rate=args.faults,
                            seed=args.seed, record=False)


def run_ours(args: argparse.Namespace, mix: list[tuple[str, int]], latency: Latency, concurrency: int) -> Side:
    with tempfile.TemporaryDirectory() as tmp, simulator(args, latency) as svc:
        cfg = ServiceConfig(
            base_url=svc.base_url, model="simulated", rpm=args.rpm, tpm=args.tpm, concurrency=concurrency,
            timeout_s=120.0, max_retries=5, prices={},
        )
        db = Path(tmp) / "service.sqlite"
        profile = cProfile.Profile() if args.profile else None
        c0, t0 = time.process_time(), time.monotonic()
        if profile:
            profile.enable()
        client = ServiceClient(cfg, db_path=db, api_key="not-needed")
        # Distinct sample indices: every call is a real request, none is a cache hit.
        coros = [client.chat_text([{"role": "user", "content": content}], max_tokens=max_tokens, sample_index=i, stage="bench")
                 for i, (content, max_tokens) in enumerate(mix)]
        replies = client.run(coros, progress=Bar("ours") if args.progress else None)
        wall = time.monotonic() - t0
        waits = dict(client.pacer.waits)
        client.close()
        if profile:
            profile.disable()
        cpu = time.process_time() - c0
        stats = svc.stats()
    if profile:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue(), file=sys.stderr)
    ok = sum(r.ok for r in replies)
    got_429 = stats["limited_rpm"] + stats["limited_tpm"] + stats["injected_429"]
    return Side("ours", len(mix), ok, len(mix) - ok, got_429, wall, stats["ok_span_s"], stats, cpu, waits)


def reference_batch_size(rpm: int, workers: int = REFERENCE_WORKERS) -> int:
    return max(1, math.floor((rpm / 60) / (1 / 20) / workers))


async def _reference(base_url: str, mix: list[tuple[str, int]], rpm: int) -> tuple[list[int], float]:
    batch = reference_batch_size(rpm)
    pause = 60 / batch
    # The same HTTP transport as ours, so that the comparison is of the schedulers alone (with
    # httpx's pool at hundreds of connections the reference would also be CPU-bound).
    http = LeanHTTP(base_url, openai_headers("not-needed"), 120.0)
    codes: list[int] = []

    async def job(content: str, max_tokens: int) -> int:
        body = {"model": "simulated", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        try:
            await http.post_json("/chat/completions", body)
            return 200
        except ServiceFault as fault:
            return fault.http_status or 0

    t0 = time.monotonic()
    for start in range(0, len(mix), batch):
        codes += await asyncio.gather(*(job(*r) for r in mix[start:start + batch]))
        if start + batch < len(mix):
            await asyncio.sleep(pause)
    wall = time.monotonic() - t0
    await http.aclose()
    return codes, wall


def run_reference(args: argparse.Namespace, mix: list[tuple[str, int]], latency: Latency) -> Side:
    with simulator(args, latency) as svc:
        codes, wall = asyncio.run(_reference(svc.base_url, mix, args.rpm))
        stats = svc.stats()
    ok = sum(c == 200 for c in codes)
    return Side("reference", len(mix), ok, len(mix) - ok, sum(c == 429 for c in codes), wall, stats["ok_span_s"], stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rpm", type=int, default=1200, help="the endpoint's request limit, also given to our client")
    ap.add_argument("--tpm", type=int, default=None, help="the endpoint's token limit, also given to our client")
    ap.add_argument("--latency", default=None, help="lognormal:MEDIAN_S (p99 = 8 x median), fixed:S or S; overrides --latency-ms")
    ap.add_argument("--latency-ms", type=float, default=200.0, help="a fixed latency (the earlier setting)")
    ap.add_argument("--faults", type=float, default=0.0, help="share of requests refused at once (half 429, half 5xx)")
    ap.add_argument("--concurrency", type=int, default=None, help="our calls in flight; default from Little's law")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true", help="show our client's progress bar")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference scheduler (its figures print as 0)")
    ap.add_argument("--profile", action="store_true", help="print our side's cProfile to stderr (inflates cpu_ms_per_call)")
    args = ap.parse_args()
    latency = Latency.parse(args.latency) if args.latency else Latency.fixed(args.latency_ms / 1000)
    mix, mix_line = request_mix(args.requests, args.rpm, args.tpm, args.seed)
    limit, limit_line = binding_limit(mix, args.rpm, args.tpm)
    mean_latency = latency.median_s * math.exp(latency.sigma**2 / 2)
    # Little's law: calls in flight = rate × mean latency; twice that leaves room for the tail
    # and for calls holding a slot while they wait for their paced time.
    concurrency = args.concurrency or max(ServiceConfig().concurrency, 16 * math.ceil((2 * limit / 60 * mean_latency + 64) / 16))

    print(f"latency median {latency.median_s:g} s, sigma {latency.sigma:.3f} (mean {mean_latency:.2f} s, "
          f"p99 {latency.median_s * math.exp(2.3263 * latency.sigma):.2f} s); faults {args.faults:g}; "
          f"{args.requests} requests; our concurrency {concurrency}", flush=True)
    print(mix_line)
    print(limit_line, flush=True)
    ours = run_ours(args, mix, latency, concurrency)
    print(f"ours done: {ours.ok} ok in {ours.wall_s:.1f} s; paced waits set by {ours.waits}", flush=True)
    empty = Side("reference", args.requests, 0, 0, 0, 0.0, 0.0, {})
    ref = empty if args.no_reference else run_reference(args, mix, latency)
    batch = reference_batch_size(args.rpm)
    print(f"reference batch {batch} every {60 / batch:.3f} s")
    print(f"{'side':<10} {'ok':>6} {'failed':>7} {'429s':>6} {'5xx':>5} {'wall s':>7} {'span s':>7} "
          f"{'ok/min':>8} {'÷ limit':>8} {'wall ok/min':>11}")
    for s in (ours, ref):
        print(f"{s.name:<10} {s.ok:>6} {s.failed:>7} {s.got_429:>6} {s.stats.get('injected_5xx', 0):>5} {s.wall_s:>7.1f} "
              f"{s.span_s:>7.1f} {s.rate_per_min:>8.0f} {s.rate_per_min / limit:>8.3f} {s.wall_rate_per_min:>11.0f}")
    for s in (ours, ref):
        if s.stats:
            print(f"{s.name} simulator: {s.stats}")
    print(f"ratio_to_limit={ours.rate_per_min / limit:.3f} failed={ours.failed} "
          f"cpu_ms_per_call={1000 * ours.cpu_s / args.requests:.3f} "
          f"reference_ratio={ref.rate_per_min / limit:.3f} reference_failed={ref.failed}")


if __name__ == "__main__":
    main()
