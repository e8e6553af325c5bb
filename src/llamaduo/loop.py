"""The orchestrator: rounds of train → infer → judge (→ synthesize → retrain), stop rules, resume.

Every stage records in `manifest.json` the hashes of its inputs, component by component.
On a rerun a stage is skipped when its outputs exist and the hashes match; when they do not,
the stage reruns, the changed components are named, and everything downstream follows
because each stage's hash includes the hash of the stage before it.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llamaduo.config import Config, dump_config
from llamaduo.data import Example, load_examples
from llamaduo.errors import UserError
from llamaduo.progress import Display, make_display
from llamaduo.store import (
    RunStore,
    atomic_write_text,
    hash_file,
    hash_obj,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
)


class RoundSummary(BaseModel):
    round: int
    value: float
    passed: bool
    train_examples: int
    synthetic_added: int = 0


class LoopResult(BaseModel):
    run_dir: Path
    stop_reason: str
    best_round: int
    best_value: float
    rounds: list[RoundSummary]


# ------------------------------------------------------------------- stage records
def _stage(store: RunStore, display: Display, key: str, components: dict[str, Any], outputs: list[Path]):
    """Decide whether stage `key` must run. Returns (inputs_hash, must_run)."""
    hashes = {k: v if isinstance(v, str) else hash_obj(v) for k, v in components.items()}
    inputs_hash = hash_obj(hashes)
    rec = store.stage_record(key)
    outputs_ok = all(p.exists() for p in outputs)
    if rec and rec.get("status") == "done" and rec.get("inputs_hash") == inputs_hash and outputs_ok:
        display({"event": "stage_skip", "stage": key, "round": _round_of(key)})
        return inputs_hash, False
    if rec and rec.get("status") == "done" and rec.get("inputs_hash") != inputs_hash:
        old = rec.get("components", {})
        changed = sorted(k for k in hashes if old.get(k) != hashes[k]) or ["unknown"]
        display({"event": "invalidated", "stage": key, "round": _round_of(key), "changed": changed})
    return inputs_hash, True


def _round_of(key: str) -> int | None:
    return int(key[1:3]) if key.startswith("r") and key[1:3].isdigit() else None


def _done(store: RunStore, key: str, inputs_hash: str, components: dict[str, Any], **extra: Any) -> None:
    hashes = {k: v if isinstance(v, str) else hash_obj(v) for k, v in components.items()}
    store.mark_stage(key, "done", inputs_hash=inputs_hash, components=hashes, **extra)


def synth_count(cfg: Config, r: int) -> int:
    """Synthetic pairs requested in round r ≥ 1 by the growth schedule."""
    if cfg.synth.growth == "double":
        return min(cfg.synth.per_round * 2 ** (r - 1), cfg.synth.max_per_round)
    return min(cfg.synth.per_round, cfg.synth.max_per_round)


# ------------------------------------------------------------------------ stages
class Run:
    """One run directory with its config; stage methods are shared by `run` and the CLI."""

    def __init__(self, cfg: Config, display: Display | None = None, client=None):
        self.cfg = cfg
        self.store = RunStore(cfg.run_dir)
        self.display = display or make_display("quiet")
        self._client = client

    # ---- collaborators
    @property
    def client(self):
        if self._client is None:
            from llamaduo.service import ServiceClient

            self._client = ServiceClient(self.cfg.service, db_path=self.store.service_db)
        return self._client

    def close(self) -> None:
        if self._client is not None and hasattr(self._client, "close"):
            self._client.close()

    def _timed(self, key: str):
        self.display({"event": "stage_start", "stage": key, "round": _round_of(key)})
        return time.monotonic()

    def _finish(self, key: str, t0: float, detail: str = "") -> None:
        self.display(
            {"event": "stage_done", "stage": key, "round": _round_of(key), "seconds": time.monotonic() - t0, "detail": detail}
        )

    def _record_ledger(self) -> None:
        if self._client is not None and hasattr(self._client, "ledger"):
            self.store.update_manifest(ledger=self._client.ledger())

    # ---- prepare
    def prepare(self) -> str:
        from llamaduo import prepare as prepare_mod

        cfg = self.cfg
        if cfg.data.input is None:
            if self.store.train_path.exists() and self.store.test_path.exists():
                return self.store.stage_record("prepare")["inputs_hash"] if self.store.stage_record("prepare") else "given"
            raise UserError("data.input is not set and the run directory has no data/train.jsonl")
        if not Path(cfg.data.input).exists():
            raise UserError(f"data.input: {cfg.data.input}: no such file or directory")
        components = {
            "data_config": cfg.data.model_dump(mode="json", exclude={"input", "test_file", "tokenizer"}),
            "input": _path_hash(cfg.data.input),
            "test_file": _path_hash(cfg.data.test_file) if cfg.data.test_file else "",
            "seed": str(cfg.seed),
        }
        key = "prepare"
        h, must = _stage(self.store, self.display, key, components, [self.store.train_path, self.store.test_path])
        if must:
            t0 = self._timed(key)
            res = prepare_mod.prepare(cfg, self.store)
            for w in res.warnings:
                self.display({"event": "warning", "message": w})
            _done(self.store, key, h, components, train=res.train_count, test=res.test_count)
            self._finish(key, t0, f"train {res.train_count}, test {res.test_count}")
        return h

    # ---- data of a round
    def train_set(self, r: int) -> list[Example]:
        examples = load_examples(self.store.train_path)
        for k in range(1, r + 1):
            p = self.store.synthetic_path(k)
            if p.exists():
                examples += load_examples(p)
        return examples

    def test_set(self) -> list[Example]:
        return load_examples(self.store.test_path)

    # ---- synth (round ≥ 1)
    def synth(self, r: int, upstream: str) -> str:
        from llamaduo import dedup, synth

        if r < 1:
            raise UserError("synthesis runs in rounds ≥ 1 (round 0 trains on the coverage data only)")
        cfg = self.cfg
        components = {
            "upstream": upstream,
            "synth": cfg.synth.model_dump(mode="json"),
            "dedup": cfg.dedup.model_dump(mode="json") if hasattr(cfg, "dedup") else {},
            "model": cfg.synth_model,
            "count": str(synth_count(cfg, r)),
            "seed": str(cfg.seed),
        }
        key = f"r{r:02d}/synth"
        outputs = [self.store.synthetic_path(r), self.store.rejected_path(r)]
        h, must = _stage(self.store, self.display, key, components, outputs)
        if not must:
            return h
        t0 = self._timed(key)
        train = load_examples(self.store.train_path)
        existing = self.train_set(r - 1)
        test = self.test_set()
        rng = random.Random(f"{cfg.seed}-synth-{r}")
        weights = self._category_weights(r - 1)
        res = synth.synthesize(cfg, self.client, train, synth_count(cfg, r), r, rng, weights=weights)
        kept, rejected = dedup.clean(res.examples, existing, test, cfg)
        rejected = list(res.rejected) + list(rejected)
        write_jsonl(self.store.rejected_path(r), rejected)
        write_jsonl(self.store.synthetic_path(r), kept)
        self._record_ledger()
        _done(self.store, key, h, components, kept=len(kept), rejected=len(rejected), calls=res.calls)
        self._finish(key, t0, f"{len(kept)} kept, {len(rejected)} rejected")
        return h

    def _category_weights(self, prev: int) -> dict[str, float] | None:
        """Weight seeds toward the categories that scored lowest last round."""
        p = self.store.scores_path(prev)
        if prev < 0 or not p.exists():
            return None
        per_cat = read_json(p).get("per_category") or {}
        metric = self.cfg.judge.pass_rule.metric
        vals = {c: v.get(metric) if isinstance(v, dict) else v for c, v in per_cat.items()}
        vals = {c: float(v) for c, v in vals.items() if isinstance(v, (int, float))}
        if not vals:
            return None
        return {c: max(1.0, 101.0 - v) for c, v in vals.items()}

    # ---- train
    def train(self, r: int, upstream: str) -> str:
        from llamaduo import train as train_mod

        cfg = self.cfg
        examples = self.train_set(r)
        init_adapter = self.store.adapter_dir(r - 1) if cfg.train.continue_from_previous and r > 0 else None
        components = {
            "upstream": upstream,
            "model": cfg.model.model_dump(mode="json"),
            "train": cfg.train.model_dump(mode="json"),
            "examples": [e.id for e in examples],
            "init_adapter": self.store.stage_record(f"r{r - 1:02d}/train").get("inputs_hash", "")
            if init_adapter is not None and self.store.stage_record(f"r{r - 1:02d}/train")
            else "",
            "seed": str(cfg.seed),
        }
        key = f"r{r:02d}/train"
        h, must = _stage(self.store, self.display, key, components, [self.store.adapter_dir(r)])
        if not must:
            return h
        rec = self.store.stage_record(key)
        if rec and rec.get("inputs_hash") != h:
            # Checkpoints of different inputs must not be resumed from.
            shutil.rmtree(self.store.checkpoints_dir(r), ignore_errors=True)
        shutil.rmtree(self.store.adapter_dir(r), ignore_errors=True)
        self.store.mark_stage(key, "running", inputs_hash=h)
        t0 = self._timed(key)
        res = train_mod.train(cfg, examples, self.store.adapter_dir(r), init_adapter=init_adapter)
        if int(os.environ.get("RANK", "0")) != 0:
            return h  # under `accelerate launch` only the main process records results
        write_json(self.store.train_result_path(r), res.model_dump(mode="json"))
        _done(self.store, key, h, components, examples=len(examples))
        dropped = f", {res.dropped_too_long} dropped (prompt fills train.max_length)" if res.dropped_too_long else ""
        self._finish(key, t0, f"{len(examples)} examples{dropped}, loss {res.train_loss:.3f}, {res.tokens_per_s:.0f} tok/s")
        return h

    # ---- infer
    def infer(self, r: int, upstream: str) -> str:
        from llamaduo import infer as infer_mod

        cfg = self.cfg
        test = self.test_set()
        components = {
            "upstream": upstream,
            "infer": cfg.infer.model_dump(mode="json"),
            "test": hash_file(self.store.test_path),
            "seed": str(cfg.seed),
        }
        key = f"r{r:02d}/infer"
        h, must = _stage(self.store, self.display, key, components, [self.store.predictions_path(r)])
        if not must:
            return h
        t0 = self._timed(key)
        completions = infer_mod.run_inference(cfg, test, self.store.adapter_dir(r))
        write_jsonl(self.store.predictions_path(r), completions)
        new_tokens = sum(c.new_tokens for c in completions)
        _done(
            self.store, key, h, components, predictions=len(completions), seconds=round(time.monotonic() - t0, 3),
            new_tokens=new_tokens,
        )
        self._finish(key, t0, f"{len(completions)} candidates")
        return h

    # ---- judge
    def judge(self, r: int, upstream: str, baseline: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        from llamaduo import judge as judge_mod

        cfg = self.cfg
        components = {"upstream": upstream, "judge": cfg.judge.model_dump(mode="json"), "model": cfg.judge_model}
        key = f"r{r:02d}/judge"
        outputs = [self.store.judgments_path(r), self.store.scores_path(r)]
        h, must = _stage(self.store, self.display, key, components, outputs)
        if must:
            t0 = self._timed(key)
            test = self.test_set()
            preds = read_jsonl(self.store.predictions_path(r))
            judgments = judge_mod.judge_predictions(cfg, self.client, test, preds, round=r)
            scores = judge_mod.compute_scores(judgments, len(preds), test=test, cfg=cfg)
            write_jsonl(self.store.judgments_path(r), judgments)
            write_json(self.store.scores_path(r), scores.model_dump(mode="json"))
            self._record_ledger()
            _done(self.store, key, h, components)
            self._finish(key, t0, f"{len(judgments)} judgments")
        return h, read_json(self.store.scores_path(r))

    # ---- service baseline (performance matching)
    def baseline(self, upstream: str) -> dict[str, Any] | None:
        from llamaduo import judge as judge_mod

        cfg = self.cfg
        if cfg.judge.pass_rule.relative_to_service is None:
            return None
        components = {
            "upstream": upstream,
            "judge": cfg.judge.model_dump(mode="json"),
            "service_model": cfg.service.model,
            "k": str(cfg.infer.num_samples),
        }
        key = "baseline"
        d = self.store.baseline_dir
        outputs = [d / "predictions.jsonl", d / "judgments.jsonl", d / "scores.json"]
        h, must = _stage(self.store, self.display, key, components, outputs)
        if must:
            t0 = self._timed(key)
            test = self.test_set()
            preds = judge_mod.service_baseline(cfg, self.client, test)
            write_jsonl(d / "predictions.jsonl", preds)
            rows = read_jsonl(d / "predictions.jsonl")
            judgments = judge_mod.judge_predictions(cfg, self.client, test, rows, round=None, stage="baseline")
            scores = judge_mod.compute_scores(judgments, len(rows), test=test, cfg=cfg)
            write_jsonl(d / "judgments.jsonl", judgments)
            write_json(d / "scores.json", scores.model_dump(mode="json"))
            self._record_ledger()
            _done(self.store, key, h, components)
            self._finish(key, t0, "service baseline judged")
        return read_json(d / "scores.json")


def _path_hash(p: Path | None) -> str:
    from llamaduo.store import hash_dir

    if p is None:
        return ""
    p = Path(p)
    return hash_dir(p) if p.is_dir() else hash_file(p)


def _decide(cfg: Config, scores: dict[str, Any], baseline: dict[str, Any] | None):
    from llamaduo import judge as judge_mod

    return judge_mod.evaluate_pass(
        judge_mod.Scores.model_validate(scores),
        cfg.judge.pass_rule,
        judge_mod.Scores.model_validate(baseline) if baseline else None,
    )


# --------------------------------------------------------------------------- run
def run(cfg: Config, fresh: bool = False, display: Display | str = "rich", client=None) -> LoopResult:
    """Run (or resume) the migration loop in `cfg.run_dir` until a stop rule fires."""
    from llamaduo.service import BudgetExceeded

    show = make_display(display) if isinstance(display, str) else display
    store = RunStore(cfg.run_dir)
    if fresh and store.root.exists():
        if not store.manifest_path.exists():
            raise UserError(f"{store.root}: exists but is not a run directory; not deleting it")
        shutil.rmtree(store.root)
    run_ = Run(cfg, show, client)
    t_start = time.monotonic()
    try:
        h = run_.prepare()
        atomic_write_text(store.config_path, dump_config(cfg))
        store.init_manifest(cfg.seed)
        store.update_manifest(state="running", stop_reason=None)
        rounds: list[RoundSummary] = []
        best: tuple[float, int] | None = None
        since_best = 0
        stop_reason = "max_rounds"
        try:
            baseline = run_.baseline(h)
            upstream = h
            for r in range(cfg.loop.max_rounds):
                added = 0
                if r > 0:
                    upstream = run_.synth(r, upstream)
                    added = len(read_jsonl(store.synthetic_path(r)))
                upstream = run_.train(r, upstream)
                upstream = run_.infer(r, upstream)
                upstream, scores = run_.judge(r, upstream, baseline)
                decision = _decide(cfg, scores, baseline)
                value = float(decision.value)
                summary = RoundSummary(
                    round=r, value=value, passed=decision.passed, train_examples=len(run_.train_set(r)), synthetic_added=added
                )
                rounds.append(summary)
                improved = best is None or value >= best[0] + cfg.loop.min_delta and value > best[0]
                best = better_round(best, value, r)
                since_best = 0 if improved else since_best + 1
                ledger = store.load_manifest().get("ledger") or {}
                spend = float((ledger.get("total") or {}).get("usd", 0.0)) if isinstance(ledger, dict) else 0.0
                store.set_round(r, **summary.model_dump(), decision=decision.model_dump(mode="json"))
                store.update_manifest(best_round=best[1], best_value=best[0])
                show(
                    {
                        "event": "round_done",
                        "round": r,
                        "value": value,
                        "target": float(decision.target),
                        "passed": decision.passed,
                        "metric": cfg.judge.pass_rule.metric,
                        "statistic": decision.statistic,
                        "spend_usd": spend,
                    }
                )
                _write_report(store, show)
                if decision.passed:
                    stop_reason = "target_met"
                    break
                if _budget_spent(cfg, ledger):
                    stop_reason = "budget"
                    break
                if cfg.loop.patience is not None and since_best >= cfg.loop.patience:
                    stop_reason = "no_improvement"
                    break
                if cfg.loop.max_wall_s is not None and time.monotonic() - t_start >= cfg.loop.max_wall_s:
                    stop_reason = "wall_clock"
                    break
        except BudgetExceeded as e:
            stop_reason = "budget"
            show({"event": "warning", "message": f"budget reached: {e}"})
            run_._record_ledger()
        if best is None:
            best = (0.0, 0)
        store.update_manifest(state="finished", stop_reason=stop_reason, best_round=best[1], best_value=best[0])
        show({"event": "stop", "reason": stop_reason, "best_round": best[1], "value": best[0]})
        _write_report(store, show)
        return LoopResult(run_dir=store.root, stop_reason=stop_reason, best_round=best[1], best_value=best[0], rounds=rounds)
    finally:
        run_.close()


def better_round(best: tuple[float, int] | None, value: float, r: int) -> tuple[float, int]:
    """The result is the best round by the pass statistic, not merely the last (ties keep the earlier)."""
    return (value, r) if best is None or value > best[0] else best


def _budget_spent(cfg: Config, ledger: dict[str, Any]) -> bool:
    total = (ledger or {}).get("total") or {}
    if cfg.service.max_usd is not None and float(total.get("usd", 0.0)) >= cfg.service.max_usd:
        return True
    tokens = int(total.get("input_tokens", 0)) + int(total.get("output_tokens", 0))
    return cfg.service.max_tokens is not None and tokens >= cfg.service.max_tokens


def _write_report(store: RunStore, show: Display) -> None:
    try:
        from llamaduo import report

        report.write_report(store)
    except ImportError:
        return
    except Exception as e:  # a report must never stop a paid-for run
        show({"event": "warning", "message": f"report not written: {type(e).__name__}: {e}"})


# ----------------------------------------------------------- single stages (CLI)
def _latest_round(store: RunStore, r: int | None, default: int = 0) -> int:
    if r is not None:
        return r
    rounds = store.rounds()
    return rounds[-1] if rounds else default


def _upstream(store: RunStore, key: str) -> str:
    rec = store.stage_record(key)
    if not rec or rec.get("status") != "done":
        raise UserError(f"{store.root}: stage {key} has not run yet")
    return rec["inputs_hash"]


def _prev_key(r: int, stage: str) -> str:
    order = ["synth", "train", "infer", "judge"]
    i = order.index(stage)
    if stage == "synth":
        return f"r{r - 1:02d}/judge"
    if stage == "train" and r == 0:
        return "prepare"
    if stage == "train":
        return f"r{r:02d}/synth"
    return f"r{r:02d}/{order[i - 1]}"


def stage_train(cfg: Config, r: int | None = None) -> Path:
    run_ = Run(cfg, make_display("rich"))
    r = _latest_round(run_.store, r)
    run_.train(r, _upstream(run_.store, _prev_key(r, "train")))
    return run_.store.adapter_dir(r)


def stage_infer(cfg: Config, r: int | None = None) -> Path:
    run_ = Run(cfg, make_display("rich"))
    r = _latest_round(run_.store, r)
    run_.infer(r, _upstream(run_.store, _prev_key(r, "infer")))
    return run_.store.predictions_path(r)


def stage_judge(cfg: Config, r: int | None = None) -> Path:
    run_ = Run(cfg, make_display("rich"))
    try:
        r = _latest_round(run_.store, r)
        run_.judge(r, _upstream(run_.store, _prev_key(r, "judge")))
    finally:
        run_.close()
    return run_.store.scores_path(r)


def stage_synth(cfg: Config, r: int | None = None) -> Path:
    run_ = Run(cfg, make_display("rich"))
    try:
        r = _latest_round(run_.store, r, default=0) + (1 if r is None else 0)
        run_.synth(r, _upstream(run_.store, _prev_key(r, "synth")))
    finally:
        run_.close()
    return run_.store.synthetic_path(r)


# ------------------------------------------------------------------ status views
def status_table(run_dir: Path):
    from rich.table import Table

    store = RunStore(run_dir)
    if not store.exists():
        raise UserError(f"{run_dir}: not a run directory (no manifest.json)")
    m = store.load_manifest()
    t = Table(title=f"{run_dir} — {m.get('state', 'prepared')}; stop reason: {m.get('stop_reason') or '-'}")
    for col in ("round", "train examples", "synthetic added", "value", "passed"):
        t.add_column(col, justify="right")
    for name, rec in sorted((m.get("rounds") or {}).items()):
        best = " *" if m.get("best_round") == rec.get("round") else ""
        t.add_row(
            name + best,
            str(rec.get("train_examples", "")),
            str(rec.get("synthetic_added", "")),
            f"{rec.get('value', 0):.1f}",
            "yes" if rec.get("passed") else "no",
        )
    total = ((m.get("ledger") or {}).get("total") or {}) if isinstance(m.get("ledger"), dict) else {}
    t.caption = f"service spend ${float(total.get('usd', 0.0)):.4f}, calls {total.get('calls', 0)}"
    return t


def runs_table(runs_dir: Path):
    from rich.table import Table

    if not Path(runs_dir).is_dir():
        raise UserError(f"{runs_dir}: no such directory")
    t = Table(title=f"runs in {runs_dir}")
    for col in ("run", "state", "rounds", "best round", "best value", "spend $", "stop reason"):
        t.add_column(col)
    for d in sorted(Path(runs_dir).iterdir()):
        store = RunStore(d)
        if not store.exists():
            continue
        m = store.load_manifest()
        total = ((m.get("ledger") or {}).get("total") or {}) if isinstance(m.get("ledger"), dict) else {}
        best = m.get("best_round")
        t.add_row(
            d.name,
            str(m.get("state", "prepared")),
            str(len(m.get("rounds") or {})),
            f"r{best:02d}" if isinstance(best, int) else "-",
            f"{m['best_value']:.1f}" if isinstance(m.get("best_value"), (int, float)) else "-",
            f"{float(total.get('usd', 0.0)):.4f}",
            str(m.get("stop_reason") or "-"),
        )
    return t
