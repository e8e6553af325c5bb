"""The orchestrator: rounds of train → infer → judge (→ synthesize → retrain), stop rules, resume.

Every stage records in `manifest.json` the hashes of its inputs, component by component (see
`engine`). On a rerun a stage is skipped when its outputs exist and the hashes match; when they
do not, the stage reruns, the changed components are named, and everything downstream follows
because each stage's hash includes the hash of the stage before it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from llamaduo import runlock
from llamaduo.artifacts import METRICS, Ledger, PassDecision, RoundRecord, Scores, StageKey
from llamaduo.config import Config
from llamaduo.errors import ServiceUnavailable, UserError
from llamaduo.prepare import PrepareResult
from llamaduo.progress import Bar, Display, make_display
from llamaduo.stages import Run
from llamaduo.store import RunStore
from llamaduo.tracking import NullTracker, make_tracker

if TYPE_CHECKING:
    from llamaduo.service import Client


class LoopResult(BaseModel):
    run_dir: Path
    stop_reason: str
    best_round: int
    best_value: float | None  # None: no round could be measured
    rounds: list[RoundRecord]
    detail: str | None = None  # why it stopped, when that needs saying (service_unavailable)


def decide(cfg: Config, scores: Scores, baseline: Scores | None, store: RunStore | None = None):
    from llamaduo.scoring import evaluate_pass, require_kappa

    decision = evaluate_pass(scores, cfg.judge.pass_rule, baseline)
    if cfg.judge.require_kappa is None:
        return decision
    # judge.require_kappa: only a judge calibrated against people may pass a round
    cal = store.read_calibration() if store is not None and store.calibration_path.exists() else None
    return require_kappa(decision, cal, cfg.judge.require_kappa)


def round_extras(cfg: Config, scores: Scores, decision: PassDecision) -> dict[str, Any]:
    """What a round's line shows beside the pass statistic: a structured task's exact metrics (means; `exact`),
    the judge's score when the rule reads an exact metric (`judge`), the conditions not met."""
    out: dict[str, Any] = {}
    if scores.exact:
        out["exact"] = {m: st.mean for m, st in scores.exact.items()}
    rule = cfg.judge.pass_rule
    if rule.metric not in METRICS:
        judged = rule.judged()
        out["judge"] = {"metric": judged.metric, "statistic": judged.statistic,
                        "value": scores.stat(judged.metric, judged.statistic)}
    if rule.also and decision.failed:
        out["failed_conditions"] = decision.failed
    return out


def judge_failed(cfg: Config, scores: Scores) -> str | None:
    """Why this round's judging cannot be trusted (too few valid judgments), with a hint; else None."""
    c = scores.counts
    share = c.valid_share
    if c.candidates == 0 or (share is not None and share >= cfg.judge.min_valid) or (share is None and c.judged):
        return None
    valid = c.judgments - c.failed
    said = f" One reply: {scores.failed_reply[:160]!r}." if scores.failed_reply else ""
    return (
        f"only {valid} of {c.judgments} judge replies were valid judgments (judge.min_valid {cfg.judge.min_valid:g});"
        f" stopping before paying for more.{said} Check judge.model ({cfg.judge_model}) and"
        f" service.structured_output ({cfg.service.structured_output}; 'prompt' works with any server)."
    )


def better_round(best: tuple[float, int] | None, value: float, r: int) -> tuple[float, int]:
    """The result is the best round by the pass statistic, not merely the last (ties keep the earlier)."""
    return (value, r) if best is None or value > best[0] else best


def budget_spent(cfg: Config, ledger: Ledger | None) -> bool:
    total = ledger.total if ledger is not None else None
    if total is None:
        return False
    if cfg.service.max_usd is not None and total.usd >= cfg.service.max_usd:
        return True
    return cfg.service.max_tokens is not None and total.tokens >= cfg.service.max_tokens


def write_report(store: RunStore, show: Display) -> None:
    try:
        from llamaduo import report

        report.write_report(store)
    except ImportError:
        return
    except Exception as e:  # a report must never stop a paid-for run
        show({"event": "warning", "message": f"report not written: {type(e).__name__}: {e}"})


def _tracked(show: Display, what: str, fn, *args):
    """Experiment tracking is a side channel: its failure is a warning, never a stopped run."""
    try:
        return fn(*args)
    except Exception as e:
        show({"event": "warning", "message": f"tracking ({what}) failed: {type(e).__name__}: {e}"})
        return None


def prepare(cfg: Config, display: Display | str = "quiet") -> PrepareResult:
    """`llamaduo prepare`: validate, split and describe the data, recorded so that `run` skips it."""
    run_ = Run(cfg, make_display(display) if isinstance(display, str) else display)
    if cfg.data.input is None:
        raise UserError("no input: pass --input FILE or set data.input in the config")
    with runlock.hold(run_.store, "prepare"):
        _, result = run_.prepare(force=True)
    assert result is not None  # forced, so it ran
    return result


# --------------------------------------------------------------------------- run
def run(cfg: Config, fresh: bool = False, display: Display | str = "rich", client: Client | None = None,
        from_shadow: bool = False) -> LoopResult:
    """Run (or resume) the migration loop in `cfg.run_dir` until a stop rule fires (one process per run
    directory). `from_shadow`: add a round after the last one whose data is shadowed live traffic
    (`traffic`), whatever the earlier rounds' stop reason was."""
    with runlock.hold(RunStore(cfg.run_dir), "run"):
        return _run(cfg, fresh, display, client, from_shadow)


def _run(cfg: Config, fresh: bool, display: Display | str, client: Client | None, from_shadow: bool) -> LoopResult:
    from llamaduo.service import BudgetExceeded

    show = make_display(display) if isinstance(display, str) else display
    store = RunStore(cfg.run_dir)
    if fresh and store.root.exists():
        if not store.manifest_path.exists():
            raise UserError(f"{store.root}: exists but is not a run directory; not deleting it")
        shutil.rmtree(store.root)
    store.read_manifest()  # a damaged manifest stops here, in one line, before anything is paid for
    first_new = _traffic_round(store) if from_shadow else None
    run_ = Run(cfg, show, client, bars=Bar.factory())
    t_start = time.monotonic()
    try:
        h, _ = run_.prepare()  # bad data is said first: preparing costs nothing
        if client is None:  # judge and synthesis use the one service: its key must be there before round 0 trains
            from llamaduo.service.keys import require_key

            require_key(cfg.service)
        run_.write_config()
        store.init_manifest(cfg.seed)
        store.update_manifest(state="running", stop_reason=None)
        tracker = _tracked(show, "start", make_tracker, cfg, store) or NullTracker()
        rounds: list[RoundRecord] = []
        best: tuple[float, int] | None = None
        since_best = 0
        stop_reason = "max_rounds"
        detail = None
        try:
            baseline = run_.baseline(h)
            upstream = h
            for r in range(max(cfg.loop.max_rounds, (first_new or 0) + 1)):
                added = 0
                if r > 0:
                    # a traffic round stays one on every resume
                    step = "traffic" if r == first_new or store.stage_record(StageKey.step("traffic", r)) else "synth"
                    upstream = run_.traffic(r, upstream) if step == "traffic" else run_.synth(r, upstream)
                    added = store.read_manifest().stage(StageKey.step(step, r)).kept or 0
                upstream = run_.train(r, upstream)
                upstream = run_.infer(r, upstream)
                upstream, scores = run_.judge(r, upstream)
                decision = decide(cfg, scores, baseline, store)
                value = decision.value
                for w in scores.warnings:
                    show({"event": "warning", "round": r, "message": w})
                record = RoundRecord(
                    round=r, value=value, passed=decision.passed, train_examples=len(run_.train_set(r)),
                    synthetic_added=added, decision=decision,
                )
                rounds.append(record)
                if value is not None:
                    improved = best is None or value >= best[0] + cfg.loop.min_delta and value > best[0]
                    best = better_round(best, value, r)
                    since_best = 0 if improved else since_best + 1
                ledger = store.read_manifest().ledger
                store.set_round(record)
                if best is not None:
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
                        "spend_usd": ledger.total.usd if ledger else 0.0,
                        "failed_judgments": scores.counts.failed,
                        "judgments": scores.counts.judgments,
                        **round_extras(cfg, scores, decision),
                    }
                )
                failed_judge = judge_failed(cfg, scores)
                write_report(store, show)
                train = store.read_train_result(r) if store.train_result_path(r).exists() else None
                _tracked(show, f"round {r}", tracker.round, record, scores, train, ledger, upstream)
                if first_new is not None and r < first_new:
                    continue  # replayed on the way to the traffic round: its stop rules were applied before
                if failed_judge is not None:
                    # Nothing after this round is paid for on a judge whose word cannot be read.
                    stop_reason = "judge_failed"
                    show({"event": "warning", "round": r, "message": failed_judge})
                    break
                if decision.passed:
                    stop_reason = "target_met"
                    break
                if budget_spent(cfg, ledger):
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
            run_.engine.record_ledger()
        except ServiceUnavailable as e:
            # Not results: the failed stage stays failed, and a rerun retries exactly its failed calls.
            stop_reason, detail = "service_unavailable", str(e)
        best_value, best_round = best if best is not None else (None, 0)
        store.update_manifest(state="finished", stop_reason=stop_reason, best_round=best_round, best_value=best_value)
        show({"event": "stop", "reason": stop_reason, "best_round": best_round, "value": best_value})
        write_report(store, show)
        _tracked(show, "finish", tracker.finish, stop_reason, best_round, best_value)
        return LoopResult(
            run_dir=store.root, stop_reason=stop_reason, best_round=best_round, best_value=best_value, rounds=rounds,
            detail=detail,
        )
    finally:
        run_.close()


def _traffic_round(store: RunStore) -> int:
    """The round `--from-shadow` adds: the one after the last recorded round."""
    rounds = [rec.round for rec in store.read_manifest().round_records()]
    if not rounds:
        raise UserError(f"{store.root}: --from-shadow needs a run with a finished round; run `llamaduo run` first")
    if not store.monitor_db.exists():
        raise UserError(f"{store.root}: no monitoring data; serve with `llamaduo serve RUN_DIR --shadow RATE` first")
    return max(rounds) + 1


# ----------------------------------------------------------- single stages (CLI)
def _latest_round(store: RunStore, r: int | None, default: int = 0) -> int:
    if r is not None:
        return r
    rounds = store.rounds()
    return rounds[-1] if rounds else default


def run_stage(cfg: Config, name: str, r: int | None = None) -> Path:
    """`llamaduo train|infer|judge|synth RUN_DIR`: one stage of a round, after the stage it consumes."""
    with runlock.hold(RunStore(cfg.run_dir), name):
        return _run_stage(cfg, name, r)


def _run_stage(cfg: Config, name: str, r: int | None) -> Path:
    run_ = Run(cfg, make_display("rich"), bars=Bar.factory())
    store = run_.store
    store.read_manifest()
    try:
        # synth makes the data of the round after the latest one
        r = _latest_round(store, r) + (1 if name == "synth" and r is None else 0)
        key = StageKey.step(name, r)
        upstream = run_.engine.upstream(key)
        if name == "synth":
            run_.synth(r, upstream)
            return store.synthetic_path(r)
        if name == "train":
            run_.train(r, upstream)
            return store.adapter_dir(r)
        if name == "infer":
            run_.infer(r, upstream)
            return store.predictions_path(r)
        run_.judge(r, upstream)
        return store.scores_path(r)
    finally:
        run_.close()
