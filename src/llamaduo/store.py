"""The run directory: the only module that knows its file names.

Every write is atomic (temp file + fsync + rename) so a killed process never leaves a
half-written file that a later run would trust. `manifest.json` records, per stage, its
status and the hash of its inputs; a stage is done only when both match.

What is written as a type is read back as the same type (`artifacts`): `read_scores(r) -> Scores`,
`read_manifest() -> Manifest`. A file that does not parse as its type is a one-line `UserError`
naming the file, the field and what to rerun — never a traceback, never a guess.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from llamaduo.artifacts import (
    MANIFEST_VERSION,
    Calibration,
    Completion,
    Judgment,
    Ledger,
    Manifest,
    Parity,
    RoundRecord,
    Scores,
    StageKey,
    StageRecord,
    TrainResult,
)
from llamaduo.errors import UserError
from llamaduo.filemodes import apply_umask, umask_mode
from llamaduo.files import read_model, read_rows, write_json, write_jsonl

_TRACKED_PACKAGES = ("llamaduo", "torch", "transformers", "trl", "peft", "accelerate", "openai", "datasets", "vllm")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


EvalTarget = int | Literal["baseline", "accept"]
"""A judged set of candidates: round r, the service baseline, or the served artifact (`accept`)."""


# --------------------------------------------------------------------- run directory
class RunStore:
    """Paths, typed files and manifest of one run directory (`runs/<name>/`)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    # ---- fixed names
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def train_path(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def test_path(self) -> Path:
        return self.data_dir / "test.jsonl"

    @property
    def stats_path(self) -> Path:
        return self.data_dir / "stats.json"

    @property
    def service_db(self) -> Path:
        return self.root / "service.sqlite"

    @property
    def monitor_db(self) -> Path:
        """Live monitoring: shadow pairs, their judgments, windows, drift events, shadow spend."""
        return self.root / "monitor.sqlite"

    @property
    def baseline_dir(self) -> Path:
        """Service-LLM answers to the test prompts, judged like a round (performance matching)."""
        return self.root / "baseline"

    @property
    def deploy_dir(self) -> Path:
        return self.root / "deploy"

    @property
    def merged_dir(self) -> Path:
        """The best round's adapter merged into the base: a plain HF model dir (+ model card)."""
        return self.deploy_dir / "merged"

    def staging_dir(self, final: Path) -> Path:
        """A fresh hidden sibling of `final` to build it in, swapped in whole when complete."""
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
        staged.chmod(umask_mode(directory=True))
        return staged

    def replace_dir(self, staged: Path, final: Path) -> None:
        """Swap a completed staging directory in for `final` (the old one is removed after)."""
        apply_umask(staged)
        previous = final.parent / f".{final.name}-old-{os.getpid()}"
        if final.exists():
            os.replace(final, previous)
        os.replace(staged, final)
        shutil.rmtree(previous, ignore_errors=True)

    @property
    def model_card_path(self) -> Path:
        return self.merged_dir / "README.md"

    def gguf_path(self, kind: str) -> Path:
        """One GGUF llama.cpp wrote: `model-f16.gguf`, `model-q8_0.gguf`, `model-q4_k_m.gguf`."""
        return self.deploy_dir / f"model-{kind}.gguf"

    def gguf_adapter_path(self, kind: str) -> Path:
        """The round's LoRA adapter as a GGUF (`adapter-f16.gguf`), applied over the base's own GGUF."""
        return self.deploy_dir / f"adapter-{kind}.gguf"

    @property
    def deploy_manifest_path(self) -> Path:
        return self.deploy_dir / "manifest.json"

    @property
    def parity_path(self) -> Path:
        """`accept --runtime`'s table: each artifact judged and timed through the runtime that serves it."""
        return self.deploy_dir / "parity.json"

    def parity_dir(self, artifact: str) -> Path:  # one artifact's judged set; accept/ holds the last
        return self.deploy_dir / "parity" / artifact

    @property
    def modelfile_path(self) -> Path:
        return self.deploy_dir / "Modelfile"

    @property
    def accept_dir(self) -> Path:
        """The served artifact judged on the test split: predictions/judgments/scores like a round."""
        return self.root / "accept"

    @property
    def accept_comparison_path(self) -> Path:
        return self.accept_dir / "comparison.json"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def labels_path(self) -> Path:  # people's labels: `review` writes them (under labels_lock), `calibrate` reads them
        return self.root / "labels.jsonl"

    labels_lock = property(lambda self: self.root / ".labels.lock")  # held while labels.jsonl is rewritten

    @property
    def calibration_path(self) -> Path:
        return self.root / "calibration.json"

    @property
    def lock_path(self) -> Path:
        """Beside the run directory, not in it: `--fresh` deletes the directory while holding it (`runlock`)."""
        return self.root.parent / f".{self.root.name}.lock"

    def round_dir(self, r: int) -> Path:
        return self.root / "rounds" / f"r{r:02d}"

    def adapter_dir(self, r: int) -> Path:
        return self.round_dir(r) / "adapter"

    def checkpoints_dir(self, r: int) -> Path:
        return self.round_dir(r) / "checkpoints"

    def eval_dir(self, target: EvalTarget) -> Path:
        if target == "baseline":
            return self.baseline_dir
        if target == "accept":
            return self.accept_dir
        return self.round_dir(int(target))

    def predictions_path(self, target: EvalTarget) -> Path:
        return self.eval_dir(target) / "predictions.jsonl"

    def judgments_path(self, target: EvalTarget) -> Path:
        return self.eval_dir(target) / "judgments.jsonl"

    def scores_path(self, target: EvalTarget) -> Path:
        return self.eval_dir(target) / "scores.json"

    def synthetic_path(self, r: int) -> Path:
        return self.round_dir(r) / "synthetic.jsonl"

    def rejected_path(self, r: int) -> Path:
        return self.round_dir(r) / "rejected.jsonl"

    def traffic_path(self, r: int, part: Literal["train", "test", "rejected"] = "train") -> Path:
        """Round r's examples from live traffic (`run --from-shadow`): train, held-out test, rejected."""
        return self.round_dir(r) / f"traffic_{part}.jsonl"

    def train_result_path(self, r: int) -> Path:
        return self.round_dir(r) / "train.json"

    def rounds(self) -> list[int]:
        base = self.root / "rounds"
        if not base.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in base.iterdir() if p.is_dir() and p.name[1:].isdigit())

    def exists(self) -> bool:
        return self.manifest_path.exists()

    # ---- typed artifacts
    def _rerun(self, target: EvalTarget, what: str) -> str:
        if target == "baseline":
            return "rerun `llamaduo run` to judge the service baseline again"
        if target == "accept":
            return "rerun `llamaduo accept`"
        return f"rerun `llamaduo {what} {self.root} --round {target}`"

    def write_predictions(self, target: EvalTarget, rows: Iterable[Completion]) -> int:
        return write_jsonl(self.predictions_path(target), rows)

    def read_predictions(self, target: EvalTarget) -> list[Completion]:
        return read_rows(self.predictions_path(target), Completion, self._rerun(target, "infer"))

    def write_judgments(self, target: EvalTarget, rows: Iterable[Judgment]) -> int:
        return write_jsonl(self.judgments_path(target), rows)

    def read_judgments(self, target: EvalTarget) -> list[Judgment]:
        return read_rows(self.judgments_path(target), Judgment, self._rerun(target, "judge"))

    def write_scores(self, target: EvalTarget, scores: Scores) -> None:
        write_json(self.scores_path(target), scores.model_dump(mode="json"))

    def read_scores(self, target: EvalTarget) -> Scores:
        return read_model(self.scores_path(target), Scores, self._rerun(target, "judge"))

    def write_synthetic(self, r: int, examples: Iterable[BaseModel]) -> int:
        return write_jsonl(self.synthetic_path(r), examples)

    def write_rejected(self, r: int, rows: Iterable[dict[str, Any]]) -> int:
        return write_jsonl(self.rejected_path(r), rows)

    def write_train_result(self, r: int, result: TrainResult) -> None:
        write_json(self.train_result_path(r), result.model_dump(mode="json"))

    def read_train_result(self, r: int) -> TrainResult:
        return read_model(self.train_result_path(r), TrainResult, self._rerun(r, "train"))

    def write_calibration(self, cal: Calibration) -> None:
        write_json(self.calibration_path, cal.model_dump(mode="json"))

    def read_parity(self) -> Parity:
        return read_model(self.parity_path, Parity, f"rerun `llamaduo accept {self.root} --runtime llamacpp`")

    def read_calibration(self) -> Calibration:
        return read_model(self.calibration_path, Calibration, f"rerun `llamaduo calibrate {self.root}`")

    # ---- manifest
    def read_manifest(self) -> Manifest:
        """The manifest as written; a run directory without one reads as a fresh manifest."""
        if not self.manifest_path.exists():
            return Manifest()
        m = read_model(
            self.manifest_path, Manifest,
            "the run directory is damaged: restore manifest.json or start over with `llamaduo run CONFIG --fresh`",
        )
        if m.version != MANIFEST_VERSION:
            raise UserError(
                f"{self.manifest_path}: manifest version {m.version}, this llamaduo reads {MANIFEST_VERSION}; "
                "start over with `llamaduo run CONFIG --fresh`"
            )
        return m

    def save_manifest(self, manifest: Manifest) -> None:
        manifest.updated_at = _now()
        write_json(self.manifest_path, manifest.model_dump(mode="json", exclude_none=True))

    def init_manifest(self, seed: int) -> Manifest:
        m = self.read_manifest()
        m.created_at = m.created_at or _now()
        m.versions = package_versions()
        m.seed = seed
        self.save_manifest(m)
        return m

    def update_manifest(self, **fields: Any) -> Manifest:
        """Set top-level manifest fields, validated as the manifest's types."""
        m = self.read_manifest()
        m = Manifest.model_validate({**m.model_dump(mode="json", exclude_none=True), **_jsonable(fields)})
        self.save_manifest(m)
        return m

    def set_ledger(self, ledger: Ledger | dict[str, Any]) -> None:
        self.update_manifest(ledger=Ledger.model_validate(ledger))

    def stage_record(self, key: StageKey | str) -> StageRecord | None:
        return self.read_manifest().stage(key)

    def mark_stage(self, key: StageKey | str, status: str, inputs_hash: str | None = None, **fields: Any) -> StageRecord:
        m = self.read_manifest()
        rec = StageRecord.model_validate({"status": status, "at": _now(), "inputs_hash": inputs_hash, **_jsonable(fields)})
        m.stages[str(key)] = rec
        self.save_manifest(m)
        return rec

    def set_round(self, record: RoundRecord) -> None:
        m = self.read_manifest()
        m.rounds[f"r{record.round:02d}"] = record
        self.save_manifest(m)


def _jsonable(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in fields.items()}
