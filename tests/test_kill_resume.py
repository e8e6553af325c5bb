"""Crash safety as a user meets it: SIGKILL `llamaduo run` at random moments and resume."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sigkilled_runs_resume_to_the_uninterrupted_result_without_paying_twice():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kill_resume.py"), "--kills", "5", "--seed", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"kills=(\d+) resumed_ok=(\d+) extra_requests=(-?\d+) identical=(true|false)", last)
    assert m, last
    kills, resumed_ok, extra, identical = int(m[1]), int(m[2]), int(m[3]), m[4]
    assert kills >= 1 and resumed_ok >= kills and identical == "true"
    # A call in flight at a SIGKILL is sent again (its reply was never stored); at most one per
    # concurrency slot per kill. Completed calls are never paid twice.
    assert 0 <= extra <= 4 * kills
