"""Checkpoints cut off mid-write (a kill, a full disk) never block a round: resume skips them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from llamaduo.train import CHECKPOINT_COMPLETE
from tests.tiny import tiny_model  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def worker(model_dir: Path, root: Path, mode: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "ckpt_worker.py"), str(model_dir), str(root), mode, *extra],
                          capture_output=True, text=True, timeout=600, env=env)


def checkpoints(root: Path) -> dict[str, bool]:
    d = root / "r00" / "checkpoints"
    return {p.name: (p / CHECKPOINT_COMPLETE).exists() for p in sorted(d.glob("checkpoint-*"))} if d.is_dir() else {}


def limit_between_model_and_optimizer(model_dir: Path) -> str:
    # The checkpoint's weights fit under the limit, its optimizer state (twice as large) does not.
    return str(int((model_dir / "model.safetensors").stat().st_size * 1.5))


def test_a_kill_while_writing_a_checkpoint_is_skipped_on_resume(tiny_model, tmp_path):  # noqa: F811
    killed = worker(tiny_model, tmp_path, "fsize-kill", limit_between_model_and_optimizer(tiny_model))
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr[-2000:]
    assert checkpoints(tmp_path) == {"checkpoint-2": False}  # weights written, optimizer cut off
    again = worker(tiny_model, tmp_path, "none")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed_from_step=None steps=6" in again.stdout


def test_resume_uses_the_newest_complete_checkpoint(tiny_model, tmp_path):  # noqa: F811
    killed = worker(tiny_model, tmp_path, "kill-at-4")
    assert killed.returncode == -signal.SIGKILL
    assert checkpoints(tmp_path) == {"checkpoint-2": True, "checkpoint-4": False}
    again = worker(tiny_model, tmp_path, "none")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed_from_step=2 steps=6" in again.stdout


def test_a_full_disk_during_a_save_is_one_line_and_a_rerun_after_freeing_space_resumes(tiny_model, tmp_path):  # noqa: F811
    full = worker(tiny_model, tmp_path, "fsize-full", limit_between_model_and_optimizer(tiny_model))
    assert full.returncode == 2, full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("error: writing a checkpoint in") and "(disk full?)" in last and "Traceback" not in full.stderr
    assert checkpoints(tmp_path) == {}  # the cut-off checkpoint was removed, freeing its space
    again = worker(tiny_model, tmp_path, "none")
    assert again.returncode == 0 and "steps=6" in again.stdout, again.stderr[-2000:]
