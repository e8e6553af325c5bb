"""Experiment tracking: a run's rounds in MLflow, next to the run directory's own record.

With `tracking.backend: mlflow` each llamaduo run is one MLflow run (named after it) and each
round a child run holding that round's settings (the config sections that shape it), its data
counts and stage input hashes, the judge's statistics, the spend so far and the report as an
artifact; the parent holds the per-round series (step = round) and the stop reason. A resumed run
finds its MLflow runs again by tag and logs a round only once per set of inputs. Tracking is a
side channel: a tracking server that fails is a warning, never a stopped migration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from llamaduo.artifacts import Ledger, RoundRecord, Scores, TrainResult
from llamaduo.config import Config
from llamaduo.store import RunStore

_SECTIONS = ("model", "train", "infer", "judge", "synth", "dedup", "data")


class Tracker(Protocol):
    def round(self, record: RoundRecord, scores: Scores, train: TrainResult | None, ledger: Ledger | None,
              inputs_hash: str) -> None: ...

    def window(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, stop_reason: str, best_round: int, best_value: float | None) -> None: ...


class NullTracker:
    def round(self, *args: Any, **kwargs: Any) -> None:
        pass

    def window(self, *args: Any, **kwargs: Any) -> None:
        pass

    def finish(self, *args: Any, **kwargs: Any) -> None:
        pass


def make_tracker(cfg: Config, store: RunStore) -> Tracker:
    if cfg.tracking.backend == "mlflow":
        return MlflowTracker(cfg, store)
    return NullTracker()


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or (Path(cfg.runs_dir) / "mlruns").absolute().as_uri()


def _flat(prefix: str, tree: Any, out: dict[str, str]) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(tree)[:500]


def round_metrics(record: RoundRecord, scores: Scores, train: TrainResult | None, ledger: Ledger | None) -> dict[str, float]:
    """The numbers of one round; what was not measured is left out, never logged as 0."""
    m: dict[str, float | None] = {
        "value": record.value,
        "train_examples": record.train_examples,
        "synthetic_added": record.synthetic_added,
        "judged": scores.counts.judged,
        "failed_judgments": scores.counts.failed,
        "spend_usd": ledger.total.usd if ledger else None,
    }
    for name in ("similarity", "precision"):
        st = scores.metric(name)
        m |= {f"{name}_mean": st.mean, f"{name}_median": st.median, f"{name}_coverage_50": st.coverage_50,
              f"{name}_coverage_70": st.coverage_70}
        if st.ci:
            m |= {f"{name}_ci_low": st.ci[0], f"{name}_ci_high": st.ci[1]}
    if train is not None:
        m |= {"train_loss": train.train_loss, "train_tokens_per_s": train.tokens_per_s}
    return {k: float(v) for k, v in m.items() if v is not None}


class MlflowTracker:
    """The llamaduo run as an MLflow run, each round a child run (MlflowClient, no global state)."""

    def __init__(self, cfg: Config, store: RunStore):
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(cfg)
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store behind an opt-in; a local store needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.cfg, self.store = cfg, store
        self.client = MlflowClient(uri)
        name = cfg.tracking.experiment or "llamaduo"
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.parent_id = self._find_or_create({"llamaduo.run": cfg.name, "llamaduo.kind": "run"}, cfg.name)

    def _find(self, tags: dict[str, str]) -> str | None:
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=1)
        return found[0].info.run_id if found else None

    def _find_or_create(self, tags: dict[str, str], run_name: str, parent: str | None = None) -> str:
        existing = self._find(tags)
        if existing:
            return existing
        extra = {"mlflow.parentRunId": parent} if parent else {}
        return self.client.create_run(self.experiment_id, run_name=run_name, tags={**tags, **extra}).info.run_id

    def round(self, record: RoundRecord, scores: Scores, train: TrainResult | None, ledger: Ledger | None,
              inputs_hash: str) -> None:
        from mlflow.entities import Metric, Param

        tags = {"llamaduo.run": self.cfg.name, "llamaduo.kind": "round", "llamaduo.round": str(record.round),
                "llamaduo.inputs": inputs_hash}
        if self._find(tags):
            return  # this round with these inputs is logged already (a resumed run)
        child = self._find_or_create(tags, f"{self.cfg.name}/r{record.round:02d}", parent=self.parent_id)
        params: dict[str, str] = {}
        tree = self.cfg.model_dump(mode="json")
        for section in _SECTIONS:
            _flat(section, tree.get(section), params)
        manifest = self.store.read_manifest()
        for key, rec in manifest.stages.items():
            if key.startswith(f"r{record.round:02d}/") and rec.inputs_hash:
                params[f"inputs.{key.split('/')[1]}"] = rec.inputs_hash
        metrics = round_metrics(record, scores, train, ledger)
        ts = _now_ms()
        self.client.log_batch(child, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()],
                              params=[Param(k, v) for k, v in params.items()])
        self.client.log_batch(self.parent_id, metrics=[Metric(k, v, ts, record.round) for k, v in metrics.items()])
        for path in (self.store.report_html, self.store.report_md):
            if path.exists():
                self.client.log_artifact(child, str(path), artifact_path="report")
        self.client.set_terminated(child, "FINISHED")

    def window(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = _now_ms()
        self.client.log_batch(self.parent_id, metrics=[Metric(f"monitor.{k}", v, ts, step) for k, v in metrics.items()])

    def finish(self, stop_reason: str, best_round: int, best_value: float | None) -> None:
        self.client.set_tag(self.parent_id, "llamaduo.stop_reason", stop_reason)
        self.client.set_tag(self.parent_id, "llamaduo.best_round", str(best_round))
        if best_value is not None:
            self.client.log_metric(self.parent_id, "best_value", best_value)
        for path in (self.store.report_html, self.store.report_md):
            if path.exists():
                self.client.log_artifact(self.parent_id, str(path), artifact_path="report")
        self.client.set_terminated(self.parent_id, "FINISHED")


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
