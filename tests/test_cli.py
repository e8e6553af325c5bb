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
