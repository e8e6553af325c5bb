"""One round at the paper's volume: the loop's own overhead (synth bookkeeping, dedup, writes, report).

    python benchmarks/loop_scale.py --synthetic 256000

A run directory is prepared from demo-task coverage (`demo.task.coverage_records`, enough
records that every synthesis call gets a seed of its own), then round 1's synth stage runs
through the stage engine exactly as `llamaduo run` does: `synth.synthesize` with the real
`ServiceClient` and its SQLite call log against the loopback simulator (in a child process,
answering with `demo.task.simulator_responder`, zero latency), `dedup.clean` (exact, test
decontamination, near duplicates), the round's synthetic/rejected files, then
`report.write_report`. With no simulated latency, the wall time is the loop's own overhead (plus
the simulator's time to answer, which the CPU line separates out).

Then the run's call log is padded to at least 1M rows through `CallLog`'s write path (as
`calllog_scale.py` fills one) and `CallLog.cached` is timed on it: the run's own request hashes
and the padding's. Last line:

    seconds=<stage + report wall> peak_mb=<peak RSS> kept=<n> report_kb=<report.html> calllog_lookup_p99_ms=<ms>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import resource
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path

from calllog_scale import fill, lookups, pct

from llamaduo import report
from llamaduo.config import from_dict
from llamaduo.demo.sim_process import SimulatorProcess
from llamaduo.demo.task import SIMULATOR_MODEL, coverage_records, simulator_responder
from llamaduo.service.calllog import CallLog
from llamaduo.stages import Run

TEST = 300  # held-out items (data.max_test), what decontamination checks against


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config(tmp: Path, base_url: str, n: int, per_call: int, concurrency: int, records: int):
    cov = tmp / "coverage.jsonl"
    with open(cov, "w", encoding="utf-8") as fh:
        for r in coverage_records(records, seed=3):
            fh.write(json.dumps(r) + "\n")
    return from_dict({
        "name": "scale",
        "runs_dir": str(tmp / "runs"),
        "seed": 1,
        "data": {"input": str(cov), "max_test": TEST},
        "service": {"base_url": base_url, "model": SIMULATOR_MODEL, "concurrency": concurrency, "prices": {},
                    "max_retries": 2, "timeout_s": 60},
        "synth": {"per_round": n, "pairs_per_call": per_call},
        "model": {"base": "tiny"},  # never loaded: this benchmark stops before training
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", type=int, default=256_000, help="synth.per_round")
    ap.add_argument("--pairs-per-call", type=int, default=20, help="synth.pairs_per_call (the simulator answers at most 20)")
    ap.add_argument("--concurrency", type=int, default=64, help="service.concurrency")
    ap.add_argument("--records", type=int, default=0, help="coverage records (0: one train seed per call, plus the test split)")
    ap.add_argument("--calllog-rows", type=int, default=1_000_000, help="pad the run's call log to this many rows")
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--keep", type=Path, help="copy the run directory (report included) here before the padding")
    args = ap.parse_args()
    calls = math.ceil(args.synthetic / args.pairs_per_call)
    records = args.records or calls + TEST

    with tempfile.TemporaryDirectory() as tmp, SimulatorProcess(simulator_responder, record=False) as sim:
        tmp = Path(tmp)
        cfg = config(tmp, sim.base_url, args.synthetic, args.pairs_per_call, args.concurrency, records)
        run = Run(cfg, client=None)
        run.write_config()
        run.store.init_manifest(cfg.seed)
        h, _ = run.prepare()
        run.store.update_manifest(simulated_service=True, simulator_label="Simulated service (loop_scale benchmark).")
        print(f"prepared {records} coverage records; peak so far {peak_mb():.0f} MB", flush=True)

        # The client is made (and its call log opened) outside the timed part, as `run` does before round 0.
        _ = run.client
        cpu0, t0 = time.process_time(), time.perf_counter()
        run.synth(1, h)
        synth_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        html, _md = report.write_report(run.store)
        report_s = time.perf_counter() - t1
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        peak = peak_mb()
        run.close()
        rec = run.store.read_manifest().stage("r01/synth")
        kept = rec.kept if rec is not None else None
        with open(run.store.rejected_path(1), encoding="utf-8") as fh:
            reasons = Counter(json.loads(line)["reason"] for line in fh)
        report_kb = html.stat().st_size / 1024
        stats = sim.stats()
        print(f"synth stage {synth_s:.1f} s (calls {calls}, simulator answered {stats['ok']}), report {report_s:.1f} s"
              f" ({report_kb:.0f} KB html, {_md.stat().st_size / 1024:.0f} KB md); our process CPU {cpu:.1f} s", flush=True)
        print(f"kept {kept}; rejected " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()), flush=True)
        if args.keep:
            shutil.copytree(run.store.root, args.keep, dirs_exist_ok=True)

        # The call log padded to ≥ 1M rows, looked up through CallLog as the client does.
        db = run.store.service_db
        own = [r[0] for r in sqlite3.connect(db).execute("SELECT request_hash FROM cache")]
        log = CallLog(db)
        have = log.conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        t2 = time.perf_counter()
        pad = max(0, args.calllog_rows - have)
        asyncio.run(fill(log, pad, seed=0))
        n_rows = log.conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        lat = lookups(log.cached, pad, args.lookups, seed=0) if pad else []
        rng = random.Random(1)
        for h_own in rng.sample(own, min(len(own), args.lookups // 4)):  # the run's own entries too
            t = time.perf_counter_ns()
            log.cached(h_own)
            lat.append((time.perf_counter_ns() - t) / 1e6)
        log.close()
        print(f"call log: {have} rows from the run, padded to {n_rows} in {time.perf_counter() - t2:.0f} s; "
              f"lookup p50 {pct(lat, 50):.4f} ms over {len(lat)} lookups", flush=True)
    print(f"seconds={seconds:.1f} peak_mb={peak:.0f} kept={kept} report_kb={report_kb:.0f} "
          f"calllog_lookup_p99_ms={pct(lat, 99):.4f}")


if __name__ == "__main__":
    main()
