"""`llamaduo monitor RUN_DIR [--json]` as a user (or cron) runs it, and the report's production section."""

from __future__ import annotations

import json
import subprocess
import sys

from llamaduo.config import Config, dump_config
from llamaduo.drift import DriftMonitor
from llamaduo.monitor_store import MonitorStore
from llamaduo.store import RunStore

LLAMADUO = [sys.executable, "-m", "llamaduo.cli"]


def shadowed_run(tmp_path, scores: list[float]) -> RunStore:
    cfg = Config(name="live", runs_dir=tmp_path, judge={"pass_rule": {"threshold": 60}}, serve={"monitor_window": 4})
    store = RunStore(cfg.run_dir)
    store.init_manifest(0)
    store.config_path.write_text(dump_config(cfg))
    ms = MonitorStore(store.monitor_db)
    for i, s in enumerate(scores):
        pid = ms.add_pair([{"role": "user", "content": f"Translate sentence {i}"}], f"local {i}", model="m", ts=float(i),
                          service_answer=f"service {i}")
        ms.set_judgment(pid, s, s, s, {"precision": f"reason {i}", "similarity": "far"})
    ms.set_spend("shadow", 0.0125)
    DriftMonitor(cfg, ms).update()
    ms.close()
    return store


def monitor(*args):
    return subprocess.run([*LLAMADUO, "monitor", *map(str, args)], capture_output=True, text=True)


def test_monitor_json_exits_non_zero_while_drifted(tmp_path):
    store = shadowed_run(tmp_path, [90, 95, 100, 92] + [10, 15, 5, 12])
    out = monitor(store.root, "--json")
    assert out.returncode == 1, out.stderr
    view = json.loads(out.stdout)
    assert view["drifted"] is True and "below the target 60" in view["reason"]
    assert [w["state"] for w in view["windows"]] == ["ok", "drifted"]
    assert view["windows"][1]["ci_high"] < 60 and view["spend_usd"] == 0.0125
    worst = view["worst"][0]
    assert worst["score"] == 5 and worst["local_answer"] == "local 6" and worst["service_answer"] == "service 6"
    assert worst["reasons"]["precision"] == "reason 6"
    assert [e["kind"] for e in view["events"]] == ["drift"]


def test_monitor_exits_zero_when_live_traffic_meets_the_target(tmp_path):
    store = shadowed_run(tmp_path, [90, 95, 100, 92])
    out = monitor(store.root)
    assert out.returncode == 0, out.stderr
    assert "state: ok" in out.stdout and "$0.0125" in out.stdout


def test_monitor_without_monitoring_data_is_one_line_and_exit_2(tmp_path):
    store = RunStore(tmp_path / "never-shadowed")
    store.init_manifest(0)
    out = monitor(store.root)
    assert out.returncode == 2 and "--shadow" in out.stderr and "Traceback" not in out.stderr


def test_report_gains_a_production_section_when_monitoring_data_exists(tmp_path):
    from llamaduo.report import write_report

    store = shadowed_run(tmp_path, [90, 95, 100, 92] + [10, 15, 5, 12])
    write_report(store)
    html, md = store.report_html.read_text(), store.report_md.read_text()
    assert "id='production'" in html and "below the target 60" in html and "local 6" in html
    assert "## Production (shadowed live traffic)" in md and "drifted" in md
    bare = RunStore(tmp_path / "plain")
    bare.init_manifest(0)
    write_report(bare)
    assert "production" not in bare.report_html.read_text()
