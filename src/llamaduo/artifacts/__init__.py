"""What a run directory holds, as types: the bottom floor every stage and every view reads from.

Each file a run writes is one of these models (or JSONL rows of one); `store` writes them and
reads them back as the same type, so the loop, the report, deploy and `status` never look into
plain dicts. One spelling per key: `scores.json` says `coverage@50` and `ci`, and so does every
reader. Stage keys are a type (`StageKey`) with one declared order (`ROUND_STEPS`). Unknown keys
are refused: a file from another version or a hand edit is an error, never a guess.

`run` holds the loop's own records, `calibration` the people's labels and the judge card,
`deploy` the exports and their parity; all are importable from here.
"""

from llamaduo.artifacts.calibration import Calibration, JudgeAgreement, Label, ProbeResult
from llamaduo.artifacts.deploy import DeployManifest, GGUFFile, Parity, ParityRow
from llamaduo.artifacts.run import (
    EXACT_METRICS,
    MANIFEST_VERSION,
    METRICS,
    ROUND_STEPS,
    Agreement,
    Completion,
    Counts,
    Evaluation,
    Judgment,
    Ledger,
    LedgerRow,
    Manifest,
    MetricStats,
    PassDecision,
    RoundRecord,
    Scores,
    StageKey,
    StageRecord,
    TrainResult,
)

__all__ = [
    "EXACT_METRICS", "MANIFEST_VERSION", "METRICS", "ROUND_STEPS", "Agreement", "Calibration", "Completion", "Counts", "DeployManifest",
    "Evaluation", "GGUFFile", "JudgeAgreement", "Judgment", "Label", "Ledger", "LedgerRow", "Manifest", "MetricStats",
    "Parity", "ParityRow", "PassDecision", "ProbeResult", "RoundRecord", "Scores", "StageKey", "StageRecord", "TrainResult",
]
