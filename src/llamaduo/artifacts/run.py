"""The run's own records: stage keys and their order, candidates, judgments, scores, the pass
decision, training results, the ledger and the manifest."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_VERSION = 1
METRICS = ("similarity", "precision")
# A structured task's exact metrics (`exact.py`): shares of candidates in [0, 1], beside the judge's scores.
EXACT_METRICS = ("json_valid", "schema_valid", "tool_name_match", "arguments_exact", "field_accuracy")


class _Artifact(BaseModel):
    # Unknown keys mean a file from another version or a hand edit: refuse it instead of guessing.
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------- stage keys
ROUND_STEPS = ("synth", "train", "infer", "judge")
"""The steps of one round, in order. Round 0 has no synth: it trains on the coverage data."""

_KEY_RE = re.compile(r"^r(\d{2,})/(synth|traffic|train|infer|judge)$")


class StageKey(BaseModel):
    """`prepare`, `baseline`, `deploy`, or one round's step (`r01/train`)."""

    model_config = ConfigDict(frozen=True)
    # traffic: a round's new data from live traffic (`run --from-shadow`), in synth's place
    name: Literal["prepare", "baseline", "deploy", "synth", "traffic", "train", "infer", "judge"]
    round: int | None = None

    def __str__(self) -> str:
        return self.name if self.round is None else f"r{self.round:02d}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> StageKey:
        m = _KEY_RE.match(text)
        return cls(name=m.group(2), round=int(m.group(1))) if m else cls(name=text)  # type: ignore[arg-type]

    @classmethod
    def step(cls, name: str, r: int) -> StageKey:
        return cls(name=name, round=r)  # type: ignore[arg-type]

    def previous(self) -> StageKey | None:
        """The stage whose output this one consumes (its inputs hash includes that stage's)."""
        if self.round is None:
            return None if self.name == "prepare" else StageKey(name="prepare")
        if self.name in ("synth", "traffic"):
            return StageKey.step("judge", self.round - 1)
        if self.name == "train" and self.round == 0:
            return StageKey(name="prepare")
        return StageKey.step(ROUND_STEPS[ROUND_STEPS.index(self.name) - 1], self.round)


# ------------------------------------------------------------- rows and results
class Completion(_Artifact):
    """A row of predictions.jsonl: one of the K candidates for one test prompt."""

    prompt_id: str
    sample_index: int
    text: str
    model_hash: str = ""
    adapter_hash: str = ""
    finish_reason: str = "stop"
    new_tokens: int = 0
    model: str = ""  # who answered, when not the round's model: the service (baseline) or the served name
    served_by: str = ""  # the endpoint `accept` asked
    ok: bool = True  # False: the call for this candidate failed (baseline); recorded, never judged
    error: str | None = None


class TrainResult(_Artifact):
    """train.json of a round."""

    adapter_dir: Path
    method: str
    train_loss: float
    val_loss: float | None = None
    steps: int
    examples: int
    tokens: int  # non-padding tokens seen (all epochs)
    seconds: float
    tokens_per_s: float
    lora_r: int | None = None
    lora_alpha: int | None = None
    resumed_from_step: int | None = None
    dropped_too_long: int = 0  # examples whose prompt alone filled max_length
    bf16: bool = False  # bf16 mixed precision (and a bf16 base under LoRA)
    padding_free: bool = False


class Judgment(_Artifact):
    """One judge call's outcome for one candidate (a row of judgments.jsonl)."""

    prompt_id: str
    sample_index: int  # which of the K candidates
    judge_index: int  # which of the M judgments (per judge model)
    ok: bool
    similarity: int | None = None
    precision: int | None = None
    similarity_reason: str | None = None
    precision_reason: str | None = None
    raw: str | None = None
    error: str | None = None
    judge_model: str = ""


# ------------------------------------------------------------------------ scores
class MetricStats(_Artifact):
    """Statistics of the per-candidate mean scores of one metric (judged candidates only).

    `None` means "not measured" (no judged candidate): shown as n/a, never as 0."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    n: int = 0
    mean: float | None = None
    median: float | None = None
    # The file spells these as the pass rule names them.
    coverage_50: float | None = Field(None, alias="coverage@50")
    coverage_70: float | None = Field(None, alias="coverage@70")
    ci: list[float] | None = None  # 95 % CI of the mean by a bootstrap over test prompts: [low, high]

    def get(self, statistic: str) -> float | None:
        return {"mean": self.mean, "median": self.median, "coverage@50": self.coverage_50, "coverage@70": self.coverage_70}[
            statistic
        ]


class Counts(_Artifact):
    candidates: int = 0  # expected: every prediction row
    judged: int = 0  # with at least one valid judgment: the statistics' population
    unjudged: int = 0  # judged but no valid judgment
    missing: int = 0  # expected but never sent to the judge (max_test_prompts, absent rows)
    duplicates: int = 0  # identical to another candidate of the same prompt: judged and counted once
    length_cut: int = 0  # candidates the token limit cut off (finish_reason "length")
    judgments: int = 0
    failed: int = 0

    @property
    def valid_share(self) -> float | None:
        """Share of judge calls that gave a valid judgment; None when none was made."""
        return (self.judgments - self.failed) / self.judgments if self.judgments else None


class Agreement(_Artifact):
    judges: list[str]
    metric: Literal["similarity", "precision"]
    n: int  # candidates both judges scored
    pearson: float | None = None
    mean_abs_diff: float | None = None


class Scores(_Artifact):
    """scores.json of a round (and of the service baseline and the accepted artifact)."""

    similarity: MetricStats = Field(default_factory=MetricStats)
    precision: MetricStats = Field(default_factory=MetricStats)
    counts: Counts = Field(default_factory=Counts)
    per_category: dict[str, dict[str, float | int | None]] = Field(default_factory=dict)
    judge_models: list[str] = Field(default_factory=list)
    agreement: list[Agreement] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    failed_reply: str | None = None  # one raw reply of a failed judgment, to show what the judge said
    # Exact metrics of a structured task (json_valid, schema_valid, ...: rates in [0, 1], coverage unset), computed
    # from the predictions against the references; a metric that does not apply is absent (n/a). Empty: free text.
    exact: dict[str, MetricStats] = Field(default_factory=dict)

    def stat(self, metric: str, statistic: str) -> float | None:
        return self.metric(metric).get(statistic)

    def metric(self, name: str) -> MetricStats:
        if name in EXACT_METRICS:
            return self.exact.get(name) or MetricStats()
        return getattr(self, name)


class PassDecision(_Artifact):
    passed: bool
    value: float | None = None  # the local statistic (score 1-100 or percent); None: nothing could be measured
    target: float  # the value the statistic had to reach
    statistic: str
    metric: str
    relative: float | None = None  # local ÷ service baseline (performance matching)
    reason: str
    also: list[PassDecision] = Field(default_factory=list)  # `pass_rule.also`: each further condition's own decision
    failed: list[str] = Field(default_factory=list)  # the conditions not met ("schema_valid mean"), main rule first


class Evaluation(BaseModel):
    """Where one judged set (a round, the service baseline, the served artifact) lives, and its scores."""

    predictions: Path
    judgments: Path
    scores_path: Path
    scores: Scores


# ------------------------------------------------------------------------ ledger
class LedgerRow(_Artifact):
    calls: int = 0  # paid-for calls (not cache hits)
    cached: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0
    saved_usd: float = 0.0  # what the cache hits would have cost
    possibly_billed: int = 0  # sent by a process that died before the reply came: maybe billed, never stored
    possibly_billed_usd: float = 0.0  # the most those may have cost; counted against the budget

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Ledger(_Artifact):
    """Service spend: the total and per `stage/rNN`, from the call log."""

    total: LedgerRow = Field(default_factory=LedgerRow)
    by_stage: dict[str, LedgerRow] = Field(default_factory=dict)
    unpriced_models: list[str] = Field(default_factory=list)  # costed at 0: no price known


# ---------------------------------------------------------------------- manifest
class StageRecord(_Artifact):
    status: Literal["running", "done", "failed"]
    at: str
    inputs_hash: str | None = None
    components: dict[str, str] = Field(default_factory=dict)  # per-input hashes, to name what changed
    # What the stage produced, for status views and the report (each stage sets its own).
    train: int | None = None
    test: int | None = None
    kept: int | None = None
    rejected: int | None = None
    calls: int | None = None
    examples: int | None = None
    predictions: int | None = None
    new_tokens: int | None = None
    seconds: float | None = None
    round: int | None = None  # deploy: the round exported
    gguf: bool | None = None
    gguf_message: str | None = None


class RoundRecord(_Artifact):
    round: int
    value: float | None = None  # the pass statistic; None when nothing could be measured
    passed: bool
    train_examples: int
    synthetic_added: int = 0
    decision: PassDecision | None = None


class Manifest(_Artifact):
    """manifest.json: versions, seed, every stage's status and input hashes, rounds, spend, stop reason."""

    version: int = MANIFEST_VERSION
    created_at: str | None = None
    updated_at: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    seed: int | None = None
    state: Literal["prepared", "running", "finished"] = "prepared"
    stop_reason: str | None = None
    best_round: int | None = None
    best_value: float | None = None
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    rounds: dict[str, RoundRecord] = Field(default_factory=dict)
    ledger: Ledger | None = None
    simulated_service: bool = False
    simulator_label: str | None = None
    cost_inputs: dict[str, Any] | None = None  # `llamaduo cost --save`: the break-even inputs

    def stage(self, key: StageKey | str) -> StageRecord | None:
        return self.stages.get(str(key))

    def round_records(self) -> list[RoundRecord]:
        return [self.rounds[k] for k in sorted(self.rounds)]

    @property
    def spend_usd(self) -> float:
        return self.ledger.total.usd if self.ledger else 0.0


