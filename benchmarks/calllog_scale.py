"""The service call log at a million rows: cache-lookup latency, ledger time, bytes per call, and a resume.

    python benchmarks/calllog_scale.py --rows 1000000

Fills a fresh `service.sqlite` through `CallLog`'s own write path (inside an event loop, so
writes are grouped into one commit per loop pass, as during a run) with a run's worth of calls:
90 % answered attempts with their cache entry (a judge-sized JSON reply), 5 % provider faults
(429/5xx, no reply), 5 % cache hits, over 3 stages × 10 rounds × 2 models. Then:

- lookup: `CallLog.cached` for random hashes (80 % present, 20 % absent), each timed; p50/p99.
- ledger: `CallLog.ledger` (totals per stage and round) plus the models answered, as
  `ServiceClient.ledger` reads them; the median of 50 (mean and max printed too).
- bytes per call: the database file after a WAL checkpoint, ÷ rows of `calls`.
- resume: a stage of `--resume` calls through `ServiceClient` against the loopback simulator,
  70 % of which the log already holds; counts what the simulator received.
- the same rows in the earlier layout (schema version 1: rowid cache, replies also in `calls`,
  `calls(request_hash)` index, ledger summed over `calls`), for comparison.

The last line is machine-readable:
`calllog_rows=... lookup_p99_ms=... ledger_ms=... bytes_per_call=...`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from llamaduo.config import ServiceConfig
from llamaduo.demo.simulator import SimulatedService
from llamaduo.service import ServiceClient
from llamaduo.service.calllog import MIGRATIONS, CallLog
from llamaduo.service.ledger import ledger_from_db

STAGES = ("judge", "synth", "baseline")
MODELS = ("gpt-4o-mini", "gpt-4o")
REPLY = json.dumps({"similarity": {"score": 78, "reason": "The candidate names the same two fields as the reference."},
                    "precision": {"score": 71, "reason": "One extra sentence the reference does not have."}})


def fake_hash(i: int) -> str:
    return hashlib.sha256(f"request {i}".encode()).hexdigest()


def rows(n: int, seed: int):
    """(kind, row, cache entry) for n calls, as the client writes them."""
    rng = random.Random(seed)
    for i in range(n):
        stage, rnd, model = STAGES[i % 3], (i // 3) % 10, MODELS[(i // 30) % 2]
        base = {"stage": stage, "round": rnd, "provider": "openai", "model": model, "request_hash": fake_hash(i),
                "sample_index": i % 10, "ts": 1.7e9 + i * 0.006}
        r = rng.random()
        if r < 0.90:
            tin, tout = 900 + rng.randrange(400), 60 + rng.randrange(40)
            cost = (tin * 0.15 + tout * 0.6) / 1e6
            yield "reply", {**base, "attempt": 1, "status": "ok", "http_status": 200, "latency_ms": rng.lognormvariate(6.9, 0.9),
                            "input_tokens": tin, "output_tokens": tout, "cost_usd": cost, "raw_reply": REPLY}, \
                (model, REPLY, tin, tout, cost)
        elif r < 0.95:
            code = 429 if rng.random() < 0.5 else 503
            yield "row", {**base, "attempt": 1, "status": f"http_{code}", "http_status": code, "latency_ms": 3.0,
                          "error": f"http {code}: injected"}, None
        else:
            yield "row", {**base, "attempt": 0, "status": "cached", "saved_usd": 0.0002, "input_tokens": 1000,
                          "output_tokens": 80}, None


async def fill(log: CallLog, n: int, seed: int, per_pass: int = 5000) -> None:
    for k, (kind, row, cache) in enumerate(rows(n, seed), 1):
        if kind == "reply":
            log.record_reply(row, cache)
        else:
            log.record(**row)
        if k % per_pass == 0:
            await asyncio.sleep(0)  # end of a loop pass: the waiting writes commit together
    log.flush()


def fill_v1(path: Path, n: int, seed: int) -> None:
    """The same rows in schema version 1, as the earlier client wrote them."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    cols = ("ts", "stage", "round", "provider", "model", "request_hash", "sample_index", "attempt", "status", "http_status",
            "latency_ms", "input_tokens", "output_tokens", "cost_usd", "saved_usd", "raw_reply", "error")
    defaults = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0, "saved_usd": 0}
    batch, cache = [], []
    for _kind, row, entry in rows(n, seed):
        batch.append(tuple(row.get(c, defaults.get(c)) for c in cols))
        if entry is not None:
            cache.append((row["request_hash"], *entry, row["ts"]))
        if len(batch) >= 20000:
            with conn:
                conn.executemany(f"INSERT INTO calls ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", batch)
                conn.executemany("INSERT OR REPLACE INTO cache VALUES (?,?,?,?,?,?,?)", cache)
            batch, cache = [], []
    with conn:
        conn.executemany(f"INSERT INTO calls ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", batch)
        conn.executemany("INSERT OR REPLACE INTO cache VALUES (?,?,?,?,?,?,?)", cache)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def file_bytes(path: Path) -> int:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def lookups(cached, n_rows: int, n: int, seed: int) -> list[float]:
    rng = random.Random(seed + 1)
    out = []
    for _ in range(n):
        h = fake_hash(rng.randrange(n_rows)) if rng.random() < 0.8 else fake_hash(n_rows + rng.randrange(n_rows))
        t0 = time.perf_counter_ns()
        cached(h)
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def pct(xs: list[float], p: float) -> float:
    return statistics.quantiles(xs, n=1000)[int(p * 10) - 1]


def resume(db: Path, n: int) -> tuple[int, int, float]:
    """A stage of n calls, 70 % of them answered before: (requests received, cached, seconds)."""
    with SimulatedService(lambda req: REPLY) as svc:
        cfg = ServiceConfig(base_url=svc.base_url, model="gpt-4o-mini", concurrency=32, prices={})
        client = ServiceClient(cfg, db_path=db, api_key="not-needed")
        msgs = [{"role": "user", "content": "judge this"}]
        done = int(n * 0.7)
        client.run([client.chat_text(msgs, sample_index=i, stage="resume") for i in range(done)])  # the part done before
        client.close()
        before = svc.count
        t0 = time.monotonic()
        client = ServiceClient(cfg, db_path=db, api_key="not-needed")  # the rerun, in a new process's shoes
        replies = client.run([client.chat_text(msgs, sample_index=i, stage="resume") for i in range(n)])
        client.close()
        return svc.count - before, sum(r.cached for r in replies), time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--resume", type=int, default=10_000, help="calls in the resumed stage (0: skip)")
    ap.add_argument("--no-v1", action="store_true", help="skip the earlier layout's comparison")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "now" / "service.sqlite"
        t0 = time.monotonic()
        log = CallLog(db)
        asyncio.run(fill(log, args.rows, args.seed))
        fill_s = time.monotonic() - t0
        n_rows = log.conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        lat = lookups(log.cached, args.rows, args.lookups, args.seed)
        ledger_times = []
        for _ in range(50):
            t0 = time.perf_counter()
            log.ledger()
            log.models_answered()
            ledger_times.append((time.perf_counter() - t0) * 1000)
        log.close()
        size = file_bytes(db)
        print(f"filled {n_rows} rows in {fill_s:.1f} s ({n_rows / fill_s:.0f} rows/s through CallLog); file {size / 1e6:.1f} MB")
        print(f"lookup p50 {pct(lat, 50):.4f} ms, p99 {pct(lat, 99):.4f} ms, max {max(lat):.3f} ms ({len(lat)} lookups)")
        print(f"ledger {statistics.median(ledger_times):.3f} ms median, {statistics.mean(ledger_times):.3f} ms mean, "
              f"{max(ledger_times):.3f} ms max")
        if args.resume:
            sent, hits, secs = resume(db, args.resume)
            print(f"resume: stage of {args.resume} calls, {int(args.resume * 0.7)} answered before: "
                  f"{sent} requests sent, {hits} cache hits, {secs:.1f} s")
        if not args.no_v1:
            old = Path(tmp) / "v1" / "service.sqlite"
            old.parent.mkdir()
            fill_v1(old, args.rows, args.seed)
            old_size = file_bytes(old)
            conn = sqlite3.connect(old)
            cached = lambda h: conn.execute(  # noqa: E731
                "SELECT raw_reply, input_tokens, output_tokens, cost_usd FROM cache WHERE request_hash=?", (h,)).fetchone()
            old_lat = lookups(cached, args.rows, args.lookups, args.seed)
            t0 = time.perf_counter()
            for _ in range(3):
                ledger_from_db(conn)
                conn.execute("SELECT DISTINCT model FROM calls WHERE status='ok'").fetchall()
            old_ledger = (time.perf_counter() - t0) * 1000 / 3
            conn.close()
            print(f"earlier layout (v1), same rows: {old_size / 1e6:.1f} MB = {old_size / n_rows:.0f} bytes/call, "
                  f"lookup p99 {pct(old_lat, 99):.4f} ms, ledger {old_ledger:.1f} ms")
    print(f"calllog_rows={n_rows} lookup_p99_ms={pct(lat, 99):.4f} ledger_ms={statistics.median(ledger_times):.3f} "
          f"bytes_per_call={size / n_rows:.0f}")


if __name__ == "__main__":
    main()
