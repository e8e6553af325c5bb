"""A finished run directory built by hand with the typed artifacts and the store's writers."""

from __future__ import annotations

from pathlib import Path

from llamaduo import scoring
from llamaduo.artifacts import Completion, Judgment, RoundRecord, TrainResult
from llamaduo.config import Config, ServiceConfig, dump_config, from_dict
from llamaduo.data import Example, make_example
from llamaduo.files import atomic_write_text, write_jsonl
from llamaduo.service import ServiceClient
from llamaduo.store import RunStore

SCRIPT = "<script>alert(1)</script>"

# Per-candidate precision scores by round (4 prompts × 2 samples, each judged twice alike).
PRECISION = {
    0: [40, 45, 50, 52, 55, 58, 60, 62],
    1: [50, 60, 62, 65, 70, 72, 75, 80],
    2: [30, 70, 74, 76, 78, 80, 85, 90],
}
ROUND_STATS = {  # hand-computed from PRECISION: mean, median, coverage@50, coverage@70
    0: (52.75, 53.5, 75.0, 0.0),
    1: (66.75, 67.5, 100.0, 50.0),
    2: (72.875, 77.0, 87.5, 87.5),
}
BASELINE_PRECISION = 78  # the service LLM's own answers, judged the same way
TRAIN_SIZES = {0: 20, 1: 32, 2: 50}


def judged(tests: list[Example], scores: list[int], judges=("gpt-4o-mini", "gpt-4o-mini"), script_at=None):
    """Predictions and judgment rows: candidate k answers test k // 2, each judged once per judge."""
    preds, rows = [], []
    for k, score in enumerate(scores):
        test, sample = tests[k // 2], k % 2
        text = f"Ignore the reference. {SCRIPT} & done" if k == script_at else f"Candidate for {test.id} sample {sample}."
        preds.append(Completion(prompt_id=test.id, sample_index=sample, text=text, new_tokens=12))
        for n, model in enumerate(judges):
            rows.append(
                Judgment(
                    prompt_id=test.id, sample_index=sample, judge_index=n if judges[0] == judges[-1] else 0,
                    ok=True, similarity=score - 5, precision=score,
                    similarity_reason=f"close to the reference ({score - 5})",
                    precision_reason="answers <b>only</b> half" if k == script_at else f"mostly right ({score})",
                    judge_model=model,
                )
            )
    return preds, rows


def train_result(store: RunStore, r: int) -> TrainResult:
    return TrainResult(
        adapter_dir=store.adapter_dir(r), method="lora", train_loss=2.0 - r / 2, steps=10,
        examples=TRAIN_SIZES[r], tokens=1000, seconds=1.0, tokens_per_s=900.0,
    )


def start_run(root: Path) -> tuple[RunStore, Config, list[Example]]:
    """Config, split data and the prepare record of a run, before any round."""
    store = RunStore(root)
    store.init_manifest(seed=7)
    cfg: Config = from_dict(
        {
            "name": root.name,
            "service": {"model": "gpt-4o-mini"},
            "judge": {"pass_rule": {"metric": "precision", "statistic": "mean", "threshold": 70}},
        }
    )
    atomic_write_text(store.config_path, dump_config(cfg))
    tests = [
        make_example(f"Summarise item {i} in one line.", f"Item {i} is short and sweet.", category=cat)
        for i, cat in enumerate(["summarize", "summarize", "extract", "classify"])
    ]
    write_jsonl(store.test_path, tests)
    write_jsonl(store.train_path, [make_example(f"train {i}", f"answer {i}") for i in range(20)])
    store.mark_stage("prepare", "done", "h-prepare", train=20, test=4)
    return store, cfg, tests


def build_run(root: Path, simulated: bool = True) -> RunStore:
    """A finished three-round run written with the store helpers and the judge's own aggregation,
    as the loop would leave it: r02 is judged by a two-model panel; a service baseline exists."""
    store, cfg, tests = start_run(root)
    base_preds, base_rows = judged(tests, [BASELINE_PRECISION] * 8)
    baseline = scoring.compute_scores(base_rows, len(base_preds), test=tests)
    store.write_predictions("baseline", base_preds)
    store.write_judgments("baseline", base_rows)
    store.write_scores("baseline", baseline)

    for r, scores in PRECISION.items():
        panel = ("gpt-4o-mini", "claude-3-5-haiku-latest") if r == 2 else ("gpt-4o-mini", "gpt-4o-mini")
        preds, rows = judged(tests, scores, panel, script_at=0 if r == 2 else None)
        if r == 1:
            rows.append(
                Judgment(prompt_id=tests[0].id, sample_index=0, judge_index=2, ok=False,
                         error="invalid JSON for JudgeReply: no JSON object in the reply", judge_model="gpt-4o-mini")
            )
        store.write_predictions(r, preds)
        store.write_judgments(r, rows)
        result = scoring.compute_scores(rows, len(preds), test=tests)
        store.write_scores(r, result)
        decision = scoring.evaluate_pass(result, cfg.judge.pass_rule, baseline)
        store.write_train_result(r, train_result(store, r))
        if r > 0:
            store.write_synthetic(r, [make_example(f"syn {r}-{i}", f"resp {i}") for i in range(12 if r == 1 else 18)])
            reasons = ["near_duplicate"] * 3 + ["test_contamination"] if r == 1 else ["exact_duplicate"] * 2 + ["too_short"]
            store.write_rejected(r, [{"instruction": "x", "response": "y", "reason": x, "round": r} for x in reasons])
        store.set_round(
            RoundRecord(
                round=r, value=decision.value, passed=decision.passed, train_examples=TRAIN_SIZES[r],
                synthetic_added=TRAIN_SIZES[r] - TRAIN_SIZES.get(r - 1, 20), decision=decision,
            )
        )
    # The call log, written by the real client's logger: judge and synth calls per round, one cache hit.
    client = ServiceClient(ServiceConfig(base_url="http://127.0.0.1:9/v1", model="gpt-4o-mini"), db_path=store.service_db)
    for r in range(3):
        for _ in range(4):
            client.log.record(ts=0.0, stage="judge", round=r, model="gpt-4o-mini", status="ok", attempt=1,
                              input_tokens=1000, output_tokens=100, cost_usd=0.01)
        if r > 0:
            client.log.record(ts=0.0, stage="synth", round=r, model="gpt-4o-mini", status="ok", attempt=1,
                              input_tokens=500, output_tokens=800, cost_usd=0.05)
    client.log.record(ts=0.0, stage="judge", round=2, model="gpt-4o-mini", status="cached", attempt=0, saved_usd=0.01)
    client.log.record(ts=0.0, stage="judge", round=1, model="gpt-4o-mini", status="failed", attempt=3, error="timeout")
    ledger = client.ledger()
    client.close()
    extra = {"simulated_service": True, "simulator_label": "Offline demo: the service LLM is a scripted simulator."} if simulated else {}
    store.update_manifest(state="finished", stop_reason="target_met", best_round=2, best_value=72.88, ledger=ledger, **extra)
    return store
