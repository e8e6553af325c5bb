"""People's labels, the judge's agreement with them, and the bias probes (`calibrate`, `review`)."""

from __future__ import annotations

from pydantic import Field, model_validator

from llamaduo.artifacts.run import LedgerRow, _Artifact


# ------------------------------------------------------------------- calibration
class Label(_Artifact):
    """A row of labels.jsonl: a person's verdict on one candidate of a round (the review page writes it).

    `score` is the person's 1-100 score; `passed` their pass/fail at the pass threshold (from
    agree/disagree with the judge's verdict, or given directly). At least one is set."""

    round: int = Field(..., ge=0)
    prompt_id: str = Field(..., min_length=1)
    sample_index: int = Field(..., ge=0)
    score: int | None = Field(None, ge=1, le=100)
    passed: bool | None = None
    agree: bool | None = None  # the reviewer agreed (True) or disagreed (False) with the judge's verdict
    at: str | None = None

    @model_validator(mode="after")
    def _said_something(self) -> Label:
        if self.score is None and self.passed is None:
            raise ValueError("a label needs a score (1-100) or passed (true/false)")
        return self

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.round, self.prompt_id, self.sample_index)


class JudgeAgreement(_Artifact):
    """How one judge (or a panel's combined verdict) agrees with the people's labels."""

    judge: str  # a judge model, or "panel" for the panel's mean
    scored: int = 0  # labelled candidates with a human score and a judge score (Spearman's population)
    spearman: float | None = None
    spearman_ci: list[float] | None = None  # 95 % bootstrap CI, resampling prompts
    classified: int = 0  # labelled candidates with a human pass/fail and a judge score (kappa's population)
    kappa: float | None = None  # Cohen's kappa on pass/fail at the pass threshold
    kappa_ci: list[float] | None = None
    agreement: float | None = None  # share of pass/fail verdicts the judge and the people share


class ProbeResult(_Artifact):
    """One bias probe through one judge: its mean scores and its check against a documented threshold."""

    probe: str
    judge: str
    items: int = 0  # test items with a valid judgment of this probe
    similarity: float | None = None
    precision: float | None = None
    value: float | None = None  # what the check reads (a mean score or a mean difference)
    check: str = ""  # the rule, e.g. "precision mean ≥ 80"
    passed: bool | None = None  # None: no valid judgment, so not measured
    failed: int = 0  # failed judgments


class Calibration(_Artifact):
    """calibration.json: the judge against people's labels, and the bias probes' results."""

    at: str | None = None
    metric: str = "precision"
    threshold: float = 70.0  # a candidate passes at this score (the pass rule's)
    labels: int = 0  # label rows read
    matched: int = 0  # labels whose candidate the judge scored
    unmatched: int = 0  # labels naming no judged candidate (left out)
    judges: list[JudgeAgreement] = Field(default_factory=list)
    probes: list[ProbeResult] = Field(default_factory=list)
    probe_items: int = 0
    cost: LedgerRow = Field(default_factory=lambda: LedgerRow())  # service calls of the probes (all reruns)

    def deciding(self) -> JudgeAgreement | None:
        """The agreement that decides for the pass rule: the panel's combined verdict, else the one judge."""
        panel = [j for j in self.judges if j.judge == "panel"]
        return panel[0] if panel else (self.judges[0] if self.judges else None)


