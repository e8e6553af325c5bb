"""Crash-safety: SIGKILL the loop at random moments, resume each time, compare with an uninterrupted run.

    python benchmarks/kill_resume.py --kills 20

Runs `llamaduo run` (tiny model, loopback simulated service) once uninterrupted, then again
killed with SIGKILL at `--kills` random moments spread over the reference run's duration
(so every stage gets hit), resuming after each kill. Last line:

    kills=<n> resumed_ok=<n> extra_requests=<n> identical=<true|false>

extra_requests counts service requests the interrupted run sent beyond the reference run: a
call in flight at the moment of a SIGKILL has been sent but its reply never stored, so it is
sent again on resume (at most `service.concurrency` per kill); completed calls come from the
cache and are never paid twice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from llamaduo.demo.simulator import SimulatedService  # noqa: E402
from llamaduo.demo.task import coverage_records, simulator_responder  # noqa: E402


def responder(request: dict) -> str:
    # The demo's checker judges the real model output, so scores move from round to round.
    return simulator_responder(request)


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
        "train": {"method": "full", "learning_rate": 3e-3, "epochs": 10, "batch_size": 16, "max_length": 128, "warmup_ratio": 0.05},
        "infer": {"num_samples": 2, "max_new_tokens": 48, "temperature": 0.0, "stop": ["\n"]},
        "loop": {"max_rounds": 3},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llamaduo.cli", "run", str(config), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def outcome(run_dir: Path) -> dict:
    m = json.loads((run_dir / "manifest.json").read_text())
    return {
        "stop_reason": m.get("stop_reason"),
        "state": m.get("state"),
        "values": {k: v.get("value") for k, v in sorted((m.get("rounds") or {}).items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    from llamaduo.demo.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as td, SimulatedService(responder) as svc:
        tmp = Path(td)
        model_dir = build_tiny_model(tmp / "tiny")
        cov = tmp / "coverage.jsonl"
        cov.write_text("".join(json.dumps(r) + "\n" for r in coverage_records(72, seed=2026)))

        ref_cfg = write_config(tmp, "reference", svc.base_url, model_dir, cov)
        t0 = time.monotonic()
        proc = launch(ref_cfg)
        _, err = proc.communicate()
        ref_seconds = time.monotonic() - t0
        if proc.returncode != 0:
            sys.exit(f"reference run failed: {err.decode()[-2000:]}")
        ref_requests = svc.count
        ref = outcome(tmp / "runs" / "reference")
        print(f"reference: {ref_seconds:.1f}s, {ref_requests} requests, {ref}")

        int_cfg = write_config(tmp, "interrupted", svc.base_url, model_dir, cov)
        start_count = svc.count
        kills = resumed_ok = 0
        # Each launch pays a few seconds of imports, then resumes where the last one died; the
        # kill moments are drawn so that, over all kills, every stage of the run gets hit.
        span = max(1.0, 3.0 * ref_seconds / max(1, args.kills))
        while kills < args.kills:
            proc = launch(int_cfg)
            time.sleep(rng.uniform(2.0, 2.0 + span))
            if proc.poll() is not None:
                resumed_ok += proc.returncode == 0
                break  # this resume ran to the end before its kill moment
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            # The next launch must read what this one left; a failure shows in the final check.
            resumed_ok += 1
        proc = launch(int_cfg)
        _, err = proc.communicate()
        if proc.returncode != 0:
            resumed_ok -= 1
            print(f"final resume failed: {err.decode()[-2000:]}")
        got = outcome(tmp / "runs" / "interrupted")
        extra = (svc.count - start_count) - ref_requests
        identical = got["stop_reason"] == ref["stop_reason"] and got["values"] == ref["values"]
        print(f"interrupted: {got}")
        print(f"kills={kills} resumed_ok={resumed_ok} extra_requests={extra} identical={str(identical).lower()}")


if __name__ == "__main__":
    main()
