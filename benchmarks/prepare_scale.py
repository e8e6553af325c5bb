"""`llamaduo prepare` at scale: peak memory and time on N demo-task records, beside holding them as objects.

    python benchmarks/prepare_scale.py --records 200000

Writes N records of the demo task (with the user's own ids), then runs in fresh processes, one
after the other: `llamaduo prepare` on them (validated coverage held as compact rows, streamed out),
and the baseline — the same records loaded as `Example` objects, as prepare held them before.
Last line:

    records=<n> seconds=<prepare wall> peak_mb=<prepare peak RSS> baseline_peak_mb=<objects> ratio=<peak ÷ baseline>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = """
import resource, sys
from llamaduo.coverage import load_coverage
from llamaduo.config import DataConfig
rows = load_coverage(sys.argv[1], DataConfig()).examples  # every record as an Example object
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

PREPARE = """
import resource, sys
from llamaduo.cli import main
sys.argv = ["llamaduo", "prepare", sys.argv[1]]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    args = ap.parse_args()
    from llamaduo.demo.task import coverage_records

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(tmp / "coverage.jsonl", "w") as fh:
            for i, r in enumerate(coverage_records(args.records, 3)):
                fh.write(json.dumps({"id": f"rec-{i}", **r}) + "\n")
        (tmp / "llamaduo.yaml").write_text(
            "name: scale\nruns_dir: runs\ndata:\n  input: coverage.jsonl\nmodel:\n  base: google/gemma-3-270m\n"
        )
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PREPARE, str(tmp / "llamaduo.yaml")], capture_output=True,
                             text=True, check=True, cwd=tmp)
        seconds = time.perf_counter() - t0
        peak = float(out.stdout.strip().splitlines()[-1])
        base = subprocess.run([sys.executable, "-c", BASELINE, str(tmp / "coverage.jsonl")], capture_output=True,
                              text=True, check=True)
        base_peak = float(base.stdout.strip().splitlines()[-1])
        train = len(next((tmp / "runs").glob("*/data/train.jsonl")).read_text().splitlines())
        print(f"train rows written: {train}")
    print(f"records={args.records} seconds={seconds:.1f} peak_mb={peak:.0f} baseline_peak_mb={base_peak:.0f} "
          f"ratio={peak / base_peak:.3f}")


if __name__ == "__main__":
    main()
