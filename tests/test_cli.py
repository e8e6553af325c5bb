"""The CLI as a user runs it: a real subprocess of the installed console script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

LLAMADUO = [sys.executable, "-m", "llamaduo.cli"]


def run(*args, cwd=None):
    return subprocess.run([*LLAMADUO, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_help_does_not_import_torch():
    code = "import sys, llamaduo.cli; print(json.dumps(sorted(m for m in ('torch','transformers','trl','peft') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", "import json;" + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    assert run("--help").returncode == 0


def test_init_writes_a_config_that_validates_and_refuses_to_overwrite(tmp_path):
    assert run("init", tmp_path).returncode == 0
    assert run("config", "validate", tmp_path / "llamaduo.yaml").returncode == 0
    again = run("init", tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_config_validate_reports_the_bad_field_and_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("infer:\n  temperature: hot\n")
    res = run("config", "validate", cfg)
    assert res.returncode == 2
    assert "infer.temperature" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_config_show_applies_overrides(tmp_path):
    assert run("init", tmp_path).returncode == 0
    res = run("config", "show", tmp_path / "llamaduo.yaml", "--set", "loop.max_rounds=7")
    assert res.returncode == 0 and "max_rounds: 7" in res.stdout


@pytest.mark.parametrize("bad", ["loop.max_rounds=0", "nosuch.key=1"])
def test_bad_override_exits_2(tmp_path, bad):
    assert run("init", tmp_path).returncode == 0
    assert run("config", "validate", tmp_path / "llamaduo.yaml", "--set", bad).returncode == 2


def test_stage_command_on_a_non_run_directory_is_one_clear_line(tmp_path):
    res = run("judge", tmp_path)
    assert res.returncode == 2 and "not a run directory" in res.stderr


def test_prepare_splits_coverage_data_and_prints_the_table(tmp_path):
    src = Path(__file__).resolve().parents[1] / "src" / "llamaduo" / "demo" / "data" / "orders.jsonl"
    out = tmp_path / "run"
    res = run("prepare", "--input", src, "--out", out, "--seed", 1)
    assert res.returncode == 0, res.stderr
    train = (out / "data" / "train.jsonl").read_text().splitlines()
    test = (out / "data" / "test.jsonl").read_text().splitlines()
    assert len(train) + len(test) == len(src.read_text().splitlines())
    for cat in ("order", "cancel", "return"):
        assert cat in res.stdout
    assert (out / "manifest.json").exists() and (out / "config.yaml").exists()


def test_prepare_with_broken_lines_names_each_and_leaves_no_run_dir(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "ok", "response": "fine"}\n'
        '{"prompt": "broken", \n'
        '{"prompt": "no response here"}\n'
        '{"prompt": "", "response": "empty prompt"}\n'
    )
    out = tmp_path / "run"
    res = run("prepare", "--input", bad, "--out", out)
    assert res.returncode != 0
    for line in (2, 3, 4):
        assert f"bad.jsonl:{line}" in res.stderr
    assert not out.exists()


def _bad_coverage(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "broken", \n{"prompt": "no response"}\n')
    return bad


def _config(tmp_path, coverage, **extra):
    cfg = tmp_path / "llamaduo.yaml"
    lines = ["name: r1", f"runs_dir: {json.dumps(str(tmp_path / 'runs'))}", "data:", f"  input: {json.dumps(str(coverage))}"]
    for section, body in extra.items():
        lines += [f"{section}:"] + [f"  {k}: {v}" for k, v in body.items()]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def test_run_on_a_malformed_coverage_file_lists_file_lines_and_exits_2(tmp_path):
    res = run("run", _config(tmp_path, _bad_coverage(tmp_path)))
    assert res.returncode == 2, res.stderr
    assert "bad.jsonl:2" in res.stderr and "bad.jsonl:3: field 'response'" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "runs" / "r1").exists()


def _prepared(tmp_path):
    src = Path(__file__).resolve().parents[1] / "src" / "llamaduo" / "demo" / "data" / "orders.jsonl"
    # A model path that does not exist stops the run at its first training step, after prepare.
    cfg = _config(tmp_path, src, model={"base": json.dumps(str(tmp_path / "no-such-model"))})
    assert run("prepare", cfg).returncode == 0
    return cfg, tmp_path / "runs" / "r1"


def test_prepare_then_run_skips_prepare(tmp_path):
    cfg, _ = _prepared(tmp_path)
    res = run("run", cfg, "--json")
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert {"event": "stage_skip", "stage": "prepare"} in [{k: e.get(k) for k in ("event", "stage")} for e in events]
    assert not any(e.get("event") == "stage_start" and e.get("stage") == "prepare" for e in events)
    assert res.returncode == 2 and "Traceback" not in res.stderr  # the missing model, in one line


@pytest.mark.parametrize("command", ["run", "train", "infer", "judge", "synth", "deploy", "status", "report"])
def test_a_corrupt_manifest_is_one_line_and_exit_2_for_every_command(tmp_path, command):
    cfg, run_dir = _prepared(tmp_path)
    (run_dir / "manifest.json").write_text('{"version": 1, "stages": {"prepare": {"status": "do')
    res = run(command, cfg if command == "run" else run_dir)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "manifest.json" in res.stderr and "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) <= 3  # one message, perhaps wrapped


@pytest.mark.parametrize("command", ["train", "infer", "judge", "synth"])
def test_a_damaged_data_file_in_a_run_directory_is_named_by_line(tmp_path, command):
    cfg, run_dir = _prepared(tmp_path)
    with open(run_dir / "data" / "train.jsonl", "a") as fh:
        fh.write('{"id": "x", "messages": 5}\n')
    with open(run_dir / "data" / "test.jsonl", "a") as fh:
        fh.write('{"id": "x", "messages": 5}\n')
    if command in ("infer", "judge", "synth"):  # they need their upstream stage recorded as done
        from llamaduo.store import RunStore

        store = RunStore(run_dir)
        for key in ("r00/train", "r00/infer", "r00/judge"):
            store.mark_stage(key, "done", inputs_hash="h")
    res = run(command, run_dir)
    assert res.returncode == 2, (res.stdout, res.stderr[-2000:])
    assert ".jsonl:" in res.stderr and "field 'messages'" in res.stderr and "Traceback" not in res.stderr


def test_runs_lists_a_damaged_run_as_unreadable_and_still_shows_the_others(tmp_path):
    cfg, run_dir = _prepared(tmp_path)
    other = run_dir.parent / "other"
    other.mkdir()
    (other / "manifest.json").write_text("[]")
    res = run("runs", run_dir.parent)
    assert res.returncode == 0, res.stderr
    assert "unreadable" in res.stdout and "r1" in res.stdout
