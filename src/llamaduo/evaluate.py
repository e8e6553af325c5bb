"""Judge one set of candidates and write it like a round: a round, the service baseline, the served artifact.

All three write `predictions.jsonl`, `judgments.jsonl` and `scores.json` through the same path, so
the report, the pass rule and `accept` read them the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llamaduo.artifacts import Completion, Evaluation
from llamaduo.config import Config
from llamaduo.data import Example
from llamaduo.reporting import BarFactory
from llamaduo.store import EvalTarget, RunStore

if TYPE_CHECKING:
    from llamaduo.service import Client


def evaluate(
    cfg: Config,
    client: Client,
    store: RunStore,
    target: EvalTarget,
    test: list[Example],
    predictions: list[Completion] | None = None,
    bars: BarFactory | None = None,
) -> Evaluation:
    """Judge `predictions` (written first when given; else the target's predictions on disk)."""
    from llamaduo import exact, scoring
    from llamaduo import judge as judge_mod

    if predictions is not None:
        store.write_predictions(target, predictions)
    rows = store.read_predictions(target)
    r = target if isinstance(target, int) else None
    stage = "judge" if r is not None else str(target)
    judgments = judge_mod.judge_predictions(cfg, client, test, rows, round=r, stage=stage, bars=bars)
    duplicates, length_cut = scoring.candidate_facts(rows)
    scores = scoring.compute_scores(
        judgments, len(rows), test=test, cfg=cfg, duplicates=duplicates, length_cut=length_cut
    )
    # beside the judge: does a structured task's answer parse and fit (no service call; empty for free text)
    scores.exact = exact.exact_stats(rows, test)
    store.write_judgments(target, judgments)
    store.write_scores(target, scores)
    return Evaluation(
        predictions=store.predictions_path(target),
        judgments=store.judgments_path(target),
        scores_path=store.scores_path(target),
        scores=scores,
    )
