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
    m = re.fullmatch(
        r"kills=(\d+) resumed_ok=(\d+) extra_requests=(\d+) possibly_paid_twice=(\d+) identical=(true|false)", last
    )
    assert m, last
    kills, resumed_ok, extra, in_flight, identical = int(m[1]), int(m[2]), int(m[3]), int(m[4]), m[5]
    assert kills == 5 and resumed_ok == kills and identical == "true"
    # A call in flight at a SIGKILL may have been billed and is sent again (at most one per concurrency
    # slot per kill); a call whose reply was stored is never sent again.
    assert extra == 0 and in_flight <= 4 * kills
