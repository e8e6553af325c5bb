"""`llamaduo demo --quick` as a user runs it: the whole offline migration in a subprocess."""

import json
import os
import subprocess
import sys

from llamaduo.store import RunStore


def test_quick_demo_improves_reports_deploys_and_serves(tmp_path):
    out = tmp_path / "demo-quick"
    proc = subprocess.run(
        [sys.executable, "-m", "llamaduo.cli", "demo", "--quick", "--no-serve", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(RunStore(out).manifest_path.read_text())
    values = [manifest["rounds"][k]["value"] for k in sorted(manifest["rounds"])]
    assert len(values) >= 2
    assert values[-1] > values[0], values
    assert manifest["simulated_service"] is True
    assert RunStore(out).report_html.exists()
    assert "SIMULATOR" in proc.stderr + proc.stdout
    assert "it answered:" in proc.stdout
    assert (out / "deploy" / "merged" / "config.json").exists()
