"""Crash-safety: SIGKILL the loop at moments drawn from its own stage events, resume each time, compare.

    python benchmarks/kill_resume.py --kills 20

Runs `llamaduo run` + `llamaduo deploy` (tiny model, loopback simulated service, a checkpoint every
10 training steps) once uninterrupted, then again killed `--kills` times, resuming after each kill.
The kill moments come from the reference run's events, not from the clock, so every kill is
delivered whatever the machine's speed: each planned kill names a stage (a train stage, where
checkpoints are being written; infer; judge; synth), the report written after a round, or
`deploy`; the resumed process is watched (`--json` events) until that stage starts, then killed
at a random point of the stage's reference duration (or as soon as the stage ends, on a machine
faster than the reference's). Last line:

    kills=<n> resumed_ok=<n> extra_requests=<n> possibly_paid_twice=<n> identical=<true|false>

From the interrupted run's call log (`service.sqlite` logs each attempt before it is sent):
possibly_paid_twice counts attempts that were in flight when a process was killed (sent, never
answered: the provider may have billed them, and they are sent again); extra_requests counts
attempts sent although a reply to the same request was already stored — must be 0.
identical: same stop reason, same per-round values and the same deployed weights as the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llamaduo.demo.simulator import SimulatedService  # noqa: E402
from llamaduo.demo.task import coverage_records, simulator_responder  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}


def write_config(tmp: Path, name: str, base_url: str, model_dir: Path, cov: Path) -> Path:
    cfg = {
        "name": name,
        "runs_dir": str(tmp / "runs"),
        "seed": 3,
        "data": {"input": str(cov), "test_fraction": 0.2},
        "service": {"base_url": base_url, "model": "sim", "api_key_env": "UNSET_KEY", "concurrency": 4, "backoff_base_s": 0.01},
        "judge": {"judgments_per_candidate": 3, "pass_rule": {"threshold": 99}},  # never met: all rounds run
        "synth": {"per_round": 200, "growth": "double", "pairs_per_call": 6},
        "model": {"base": str(model_dir)},
        "train": {"method": "full", "learning_rate": 3e-3, "epochs": 10, "batch_size": 16, "max_length": 128,
                  "warmup_ratio": 0.05, "save_steps": 10},
        "infer": {"num_samples": 2, "max_new_tokens": 48, "temperature": 0.0, "stop": ["\n"]},
        "deploy": {"formats": ["hf"]},
        "loop": {"max_rounds": 3},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Watched:
    """A CLI subprocess whose JSON-line events are read as they come."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "llamaduo.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=ENV)
        self.events: queue.Queue[dict | None] = queue.Queue()
        self.t0 = time.monotonic()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put({**json.loads(line), "at": time.monotonic()})
            except ValueError:
                continue
        self.events.put(None)

    def wait_for(self, pred) -> dict | None:
        """The first event matching `pred`; None when the process ended first."""
        while True:
            ev = self.events.get()
            if ev is None or pred(ev):
                return ev

    def kill_at(self, moment: float, stage: str | None = None) -> bool:
        """SIGKILL at `moment`, or as soon as `stage` is seen done if that comes first (a machine faster
        than the reference's must not finish the stage, or the run, before its kill)."""
        while (left := moment - time.monotonic()) > 0 and self.proc.poll() is None:
            try:
                ev = self.events.get(timeout=min(left, 0.05))
            except queue.Empty:
                continue
            if ev is None or (stage is not None and ev.get("event") == "stage_done" and ev.get("stage") == stage):
                break
        if self.proc.poll() is not None:
            return False
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return True

    def finish(self) -> int:
        while self.events.get() is not None:
            pass
        return self.proc.wait()


def reference_events(config: Path) -> tuple[list[tuple[str, float]], int]:
    """(stage or `report rNN`, seconds) in run order, from an uninterrupted run's events."""
    w = Watched(["run", str(config), "--json"])
    plan: list[tuple[str, float]] = []
    started: dict[str, float] = {}
    while (ev := w.events.get()) is not None:
        if ev.get("event") == "stage_start":
            started[ev["stage"]] = ev["at"]
        elif ev.get("event") == "stage_done":
            plan.append((ev["stage"], ev["at"] - started[ev["stage"]]))
        elif ev.get("event") == "round_done":
            plan.append((f"report r{ev['round']:02d}", 0.3))
    return plan, w.proc.wait()


def weights_hash(run_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((run_dir / "deploy" / "merged").glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()


def outcome(run_dir: Path) -> dict:
    m = json.loads((run_dir / "manifest.json").read_text())
    return {
        "stop_reason": m.get("stop_reason"),
        "values": {k: v.get("value") for k, v in sorted((m.get("rounds") or {}).items())},
        "weights": weights_hash(run_dir)[:12],
    }


def paid_twice(db: Path) -> tuple[int, int]:
    """(attempts sent although their request's reply was already stored, attempts a kill left unanswered)."""
    conn = sqlite3.connect(db)
    try:
        extra = conn.execute(
            "SELECT COUNT(*) FROM sent s WHERE EXISTS (SELECT 1 FROM calls c WHERE c.request_hash = s.request_hash"
            " AND c.status = 'ok' AND c.ts < s.ts)"
        ).fetchone()[0]
        unanswered = conn.execute("SELECT COUNT(*) FROM sent WHERE answered = 0").fetchone()[0]
    finally:
        conn.close()
    return int(extra), int(unanswered)


def plan_kills(events: list[tuple[str, float]], kills: int, rng: random.Random) -> list[str]:
    """`kills` targets in run order: at least one train stage (checkpoints), one report and one deploy,
    the rest spread over the stages in proportion to their duration."""
    stages = [s for s in events if not s[0].startswith("report")]
    must = [rng.choice([s for s, _ in stages if s.endswith("/train")]), rng.choice([s for s, _ in events if s.startswith("report")]),
            "deploy"]
    weights = [max(d, 0.2) for _, d in stages]
    rest = rng.choices([s for s, _ in stages], weights=weights, k=max(0, kills - len(must)))
    order = {s: i for i, (s, _) in enumerate(events)} | {"deploy": len(events)}
    return sorted((must + rest)[:kills], key=lambda s: order[s])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    from llamaduo.demo.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as td, SimulatedService(simulator_responder) as svc:
        tmp = Path(td)
        model_dir = build_tiny_model(tmp / "tiny")
        cov = tmp / "coverage.jsonl"
        cov.write_text("".join(json.dumps(r) + "\n" for r in coverage_records(72, seed=2026)))

        ref_cfg = write_config(tmp, "reference", svc.base_url, model_dir, cov)
        t0 = time.monotonic()
        events, rc = reference_events(ref_cfg)
        if rc != 0:
            sys.exit("reference run failed")
        t_deploy = time.monotonic()
        if subprocess.run([sys.executable, "-m", "llamaduo.cli", "deploy", str(tmp / "runs" / "reference")],
                          capture_output=True, env=ENV).returncode != 0:
            sys.exit("reference deploy failed")
        events.append(("deploy", time.monotonic() - t_deploy))
        ref_requests = svc.count
        ref = outcome(tmp / "runs" / "reference")
        print(f"reference: {time.monotonic() - t0:.1f}s, {ref_requests} requests, {len(events)} kill points, {ref}")

        int_cfg = write_config(tmp, "interrupted", svc.base_url, model_dir, cov)
        run_dir = tmp / "runs" / "interrupted"
        duration = dict(events)
        start_count = svc.count
        kills = resumed_ok = pending = 0  # pending: kills whose next launch has not shown it could resume
        where: list[str] = []
        for target in plan_kills(events, args.kills, rng):
            if target == "deploy":
                manifest = run_dir / "manifest.json"
                unfinished = not manifest.exists() or json.loads(manifest.read_text()).get("state") != "finished"
                if unfinished and Watched(["run", str(int_cfg), "--json"]).finish() == 0:  # the run ends before deploy
                    resumed_ok, pending = resumed_ok + pending, 0
                w = Watched(["deploy", str(run_dir)])
                moment = w.t0 + rng.uniform(0.2, 0.6) * duration["deploy"]
            else:
                w = Watched(["run", str(int_cfg), "--json"])
                if target.startswith("report"):
                    r = int(target.split("r")[-1])
                    ev = w.wait_for(lambda e, r=r: e.get("event") == "round_done" and e.get("round") == r)
                    # The report is written right after; after the last round the run may end within
                    # 0.3 s, leaving nothing to kill (seen once: 4 of 5 kills delivered).
                    moment = time.monotonic() + rng.uniform(0.0, 0.1)
                else:
                    ev = w.wait_for(stage_begins(target))
                    moment = time.monotonic() + rng.uniform(0.05, 0.95) * duration[target]
                if ev is None:
                    if w.proc.wait() == 0:
                        resumed_ok, pending = resumed_ok + pending, 0
                    print(f"  {target}: the run ended before its kill moment")
                    continue
                resumed_ok, pending = resumed_ok + pending, 0  # it read what the last kill left and went on
            if w.kill_at(moment, target if "/" in target else None):
                kills += 1
                pending += 1
                where.append(target)
        final = Watched(["run", str(int_cfg), "--json"]).finish()
        deployed = subprocess.run([sys.executable, "-m", "llamaduo.cli", "deploy", str(run_dir)], capture_output=True,
                                  text=True, env=ENV)
        if final == 0 and deployed.returncode == 0:
            resumed_ok += pending
        else:
            print(f"final resume failed: run rc={final}, deploy rc={deployed.returncode} {deployed.stderr[-1000:]}")
        got = outcome(run_dir)
        extra, unanswered = paid_twice(run_dir / "service.sqlite")
        identical = got == ref
        print(f"kills at: {', '.join(where)}")
        print(f"interrupted: {got}; simulator saw {svc.count - start_count - ref_requests:+d} requests beyond the reference")
        print(f"kills={kills} resumed_ok={resumed_ok} extra_requests={extra} possibly_paid_twice={unanswered}"
              f" identical={str(identical).lower()}")


def stage_begins(target: str):
    """Matches the target stage's start; when it was skipped (already done), the next stage's start."""
    skipped = False

    def pred(e: dict) -> bool:
        nonlocal skipped
        if e.get("event") == "stage_skip" and e.get("stage") == target:
            skipped = True
            return False
        return e.get("event") == "stage_start" and (e.get("stage") == target or skipped)

    return pred

if __name__ == "__main__":
    main()
