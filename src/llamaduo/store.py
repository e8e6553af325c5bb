"""The run directory: the only module that knows its file names.

Every write is atomic (temp file + fsync + rename) so a killed process never leaves a
half-written file that a later run would trust. `manifest.json` records, per stage, its
status and the hash of its inputs; a stage is done only when both match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1
_TRACKED_PACKAGES = ("llamaduo", "torch", "transformers", "trl", "peft", "accelerate", "openai", "datasets", "vllm")


# ------------------------------------------------------------------ atomic file I/O
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: Iterable[Any]) -> int:
    """Write rows (dicts or pydantic models) as JSONL atomically; returns the count."""
    lines = []
    for row in rows:
        if hasattr(row, "model_dump"):
            row = row.model_dump(mode="json", exclude_none=True)
        lines.append(json.dumps(row, ensure_ascii=False, default=str))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
    return out


def hash_obj(obj: Any) -> str:
    """Stable short hash of any JSON-able object (pydantic models included)."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def hash_dir(path: Path) -> str:
    """Hash of every file's relative name and content under a directory."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(str(p.relative_to(root)).encode())
            h.update(hash_file(p).encode())
    return h.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


# --------------------------------------------------------------------- run directory
class RunStore:
    """Paths and manifest of one run directory (`runs/<name>/`)."""

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

    @property
    def gguf_path(self) -> Path:
        return self.deploy_dir / "model.gguf"

    @property
    def modelfile_path(self) -> Path:
        return self.deploy_dir / "Modelfile"

    @property
    def accept_dir(self) -> Path:
        """The served artifact judged on the test split: predictions/judgments/scores like a round."""
        return self.root / "accept"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def log_path(self) -> Path:
        return self.root / "run.log"

    def round_dir(self, r: int) -> Path:
        return self.root / "rounds" / f"r{r:02d}"

    def adapter_dir(self, r: int) -> Path:
        return self.round_dir(r) / "adapter"

    def checkpoints_dir(self, r: int) -> Path:
        return self.round_dir(r) / "checkpoints"

    def predictions_path(self, r: int) -> Path:
        return self.round_dir(r) / "predictions.jsonl"

    def judgments_path(self, r: int) -> Path:
        return self.round_dir(r) / "judgments.jsonl"

    def scores_path(self, r: int) -> Path:
        return self.round_dir(r) / "scores.json"

    def synthetic_path(self, r: int) -> Path:
        return self.round_dir(r) / "synthetic.jsonl"

    def rejected_path(self, r: int) -> Path:
        return self.round_dir(r) / "rejected.jsonl"

    def train_result_path(self, r: int) -> Path:
        return self.round_dir(r) / "train.json"

    def rounds(self) -> list[int]:
        base = self.root / "rounds"
        if not base.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in base.iterdir() if p.is_dir() and p.name[1:].isdigit())

    def exists(self) -> bool:
        return self.manifest_path.exists()

    # ---- manifest
    def load_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"version": MANIFEST_VERSION, "stages": {}, "rounds": {}}
        return read_json(self.manifest_path)

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json(self.manifest_path, manifest)

    def init_manifest(self, seed: int) -> dict[str, Any]:
        m = self.load_manifest()
        m.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        m["versions"] = package_versions()
        m["seed"] = seed
        self.save_manifest(m)
        return m

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        m = self.load_manifest()
        m.update(fields)
        self.save_manifest(m)
        return m

    def stage_done(self, stage: str, inputs_hash: str) -> bool:
        rec = self.load_manifest().get("stages", {}).get(stage)
        return bool(rec and rec.get("status") == "done" and rec.get("inputs_hash") == inputs_hash)

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        return self.load_manifest().get("stages", {}).get(stage)

    def mark_stage(self, stage: str, status: str, inputs_hash: str | None = None, **extra: Any) -> None:
        m = self.load_manifest()
        rec = {"status": status, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if inputs_hash is not None:
            rec["inputs_hash"] = inputs_hash
        rec.update(extra)
        m.setdefault("stages", {})[stage] = rec
        self.save_manifest(m)

    def set_round(self, r: int, **fields: Any) -> None:
        m = self.load_manifest()
        m.setdefault("rounds", {}).setdefault(f"r{r:02d}", {}).update(fields)
        self.save_manifest(m)

    def iter_round_files(self) -> Iterator[Path]:
        yield from sorted((self.root / "rounds").rglob("*"))
