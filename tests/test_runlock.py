"""One process per run directory: a second command on a held directory exits 2 naming the holder."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml
from rich.console import Console

from llamaduo import runlock, views
from llamaduo.store import RunStore
from tests.test_loop import make_config, responder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from llamaduo.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def table_text(table) -> str:
    con = Console(width=200, record=True)
    con.print(table)
    return con.export_text()


def test_a_second_run_on_a_held_directory_exits_2_naming_the_holder(tmp_path, fake_service, tiny_model):
    fake_service.responder = responder
    cfg = make_config(tmp_path, fake_service, tiny_model, loop={"max_rounds": 2})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    store = RunStore(cfg.run_dir)
    cmd = [sys.executable, "-m", "llamaduo.cli", "run", str(path), "--quiet"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while runlock.holder(store).get("pid") != first.pid:
        assert time.monotonic() < deadline and first.poll() is None, "the first run never took the lock"
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert f"in use by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    stage = subprocess.run([sys.executable, "-m", "llamaduo.cli", "judge", str(cfg.run_dir)],
                           capture_output=True, text=True, timeout=120)
    assert stage.returncode == 2 and f"pid {first.pid}" in stage.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    conn = sqlite3.connect(store.service_db)
    doubled = conn.execute(
        "SELECT COUNT(*) FROM (SELECT request_hash FROM calls WHERE status='ok' GROUP BY request_hash HAVING COUNT(*) > 1)"
    ).fetchone()[0]
    sent = conn.execute("SELECT COUNT(*) FROM calls WHERE status='ok'").fetchone()[0]
    assert doubled == 0 and sent == fake_service.count  # every call paid once, by the one run


def test_a_run_left_running_by_a_dead_process_is_listed_as_interrupted_and_its_lock_taken_over(tmp_path):
    store = RunStore(tmp_path / "runs" / "a")
    store.init_manifest(0)
    store.update_manifest(state="running")
    # A process that takes the lock and dies without releasing it.
    code = ("import os,sys; sys.path.insert(0, sys.argv[1]); from llamaduo import runlock; from llamaduo.store import RunStore;"
            " cm = runlock.hold(RunStore(sys.argv[2]), 'run'); cm.__enter__(); os._exit(9)")
    subprocess.run([sys.executable, "-c", code, os.environ.get("PYTHONPATH", ""), str(store.root)], check=False)
    assert runlock.holder(store).get("command") == "run"  # its name is still in the file
    assert not runlock.held(store)
    assert "interrupted" in table_text(views.runs_table(tmp_path / "runs"))
    with runlock.hold(store, "run"):  # taken over
        assert runlock.held(store)
        assert "running" in table_text(views.runs_table(tmp_path / "runs"))
        with pytest.raises(runlock.RunLocked, match=f"pid {os.getpid()}"), runlock.hold(store, "deploy"):
            pass


def test_the_lock_file_sits_beside_the_run_directory_so_fresh_can_delete_it(tmp_path):
    store = RunStore(tmp_path / "runs" / "a")
    assert store.lock_path.parent == store.root.parent and store.lock_path.name == ".a.lock"
    with runlock.hold(store, "run"):
        assert json.loads(store.lock_path.read_text())["pid"] == os.getpid()
