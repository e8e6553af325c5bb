"""LLM-as-judge: the paper's protocol — prompts, judge calls, and the service baseline.

Each candidate answer (K per test prompt) is judged M = `judge.judgments_per_candidate`
times against the test reference; one judgment scores **similarity** (to the reference) and
**precision** (correct and complete for the instruction), each 1-100 with a reason, read
only from the judge's JSON reply. Identical candidates of one prompt are judged once.

Failures are never silent and never scored: a judgment without valid JSON after the client's
retries is kept as a row with `ok=False`; `scoring` counts it and leaves it out of the
statistics. With `judge.panel` every candidate is judged by each panel model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from llamaduo import prompts
from llamaduo.artifacts import (
    Completion,
    Judgment,
)
from llamaduo.config import Config
from llamaduo.data import Example, Message
from llamaduo.errors import UserError
from llamaduo.reporting import BarFactory, bar_for

if TYPE_CHECKING:
    from llamaduo.service import Client

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


# ------------------------------------------------------------------ reply schema
class Criterion(BaseModel):
    score: int = Field(..., ge=1, le=100)
    reason: str


class JudgeReply(BaseModel):
    """The JSON a judge must reply with; anything else is a failed judgment."""

    similarity: Criterion
    precision: Criterion


# ---------------------------------------------------------------------- prompts
def format_instruction(messages: Sequence[Message]) -> str:
    """The prompt messages as the judge reads them: the user text alone when that is all."""
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    return "\n\n".join(f"[{m.role}]\n{m.content}" for m in messages)


def render_judge_prompt(
    example: Example, candidate: str, template: prompts.Template | None = None
) -> list[dict[str, str]]:
    """Chat messages asking for one judgment of `candidate` against `example`'s reference."""
    template = template or prompts.load("judge.jinja")
    return template.render(
        instruction=format_instruction(example.prompt_messages),
        reference=example.response,
        candidate=candidate,
        messages=[m.chat() for m in example.prompt_messages],
    )


def judge_template(cfg: Config) -> prompts.Template:
    return prompts.load("judge.jinja", cfg.judge.template, field="judge.template")


def judge_models(cfg: Config) -> list[str]:
    """The panel when one is configured, else the single judge model."""
    return list(dict.fromkeys(cfg.judge.panel)) or [cfg.judge_model]


def select_test(cfg: Config, test: list[Example]) -> list[Example]:
    """The test prompts judged: all, or `judge.max_test_prompts` taken round-robin over
    categories (in test order) so that every category stays represented."""
    cap = cfg.judge.max_test_prompts
    if cap is None or cap >= len(test):
        return list(test)
    by_cat: dict[str, list[Example]] = defaultdict(list)
    for ex in test:
        by_cat[ex.category].append(ex)
    picked: list[Example] = []
    queues = [iter(v) for v in by_cat.values()]
    while len(picked) < cap:
        for q in queues:
            ex = next(q, None)
            if ex is not None and len(picked) < cap:
                picked.append(ex)
    chosen = {ex.id for ex in picked}
    return [ex for ex in test if ex.id in chosen]


# ----------------------------------------------------------------------- judging
def _field(pred: Any, name: str, default: Any = None) -> Any:
    return pred.get(name, default) if isinstance(pred, dict) else getattr(pred, name, default)


def judge_predictions(
    cfg: Config,
    client: Client,
    test: list[Example],
    predictions: Iterable[Any],
    round: int | None,
    stage: str = "judge",
    bars: BarFactory | None = None,
) -> list[Judgment]:
    """Judge every candidate M times (per judge model); failed judgments stay as rows."""
    chosen = {ex.id: ex for ex in select_test(cfg, test)}
    known = {ex.id for ex in test}
    template = judge_template(cfg)
    models = judge_models(cfg)
    m_calls = cfg.judge.judgments_per_candidate
    rows: list[Judgment | None] = []
    jobs: list[tuple[int, str, int, str, int]] = []  # (row slot, prompt_id, sample, model, judge_index)
    specs: list[tuple[list[dict[str, str]], str, int]] = []  # (messages, judge model, judge_index)
    seen_texts: dict[str, set[str]] = {}
    for pred in predictions:
        pid, k = str(_field(pred, "prompt_id")), int(_field(pred, "sample_index", 0))
        if pid not in chosen:
            if pid in known:
                continue  # left out by judge.max_test_prompts
            raise UserError(f"predictions: prompt_id {pid!r} (sample {k}) is not in the test split")
        text = _field(pred, "text")
        if _field(pred, "ok", True) is False or text is None:
            # No candidate to judge (e.g. a service baseline call that failed): recorded, not scored.
            err = _field(pred, "error") or "no candidate text"
            rows.append(Judgment(prompt_id=pid, sample_index=k, judge_index=0, ok=False, error=f"no candidate: {err}"))
            continue
        if str(text).strip() in seen_texts.setdefault(pid, set()):
            continue  # identical to a candidate of this prompt already judged: counted once
        seen_texts[pid].add(str(text).strip())
        messages = render_judge_prompt(chosen[pid], str(text), template)
        for model in models:
            for j in range(m_calls):
                jobs.append((len(rows), pid, k, model, j))
                rows.append(None)
                specs.append((messages, model, j))
    label = f"{stage} r{round:02d}" if round is not None else stage
    params = {"temperature": cfg.judge.temperature, "max_tokens": cfg.judge.max_tokens, "stage": stage, "round": round}
    if not specs:
        replies = []
    elif cfg.service.use_batch:
        replies = _run_batches(client, specs, params)
    else:
        # sample_index: the M judgments of one candidate must not share a cache entry
        coros = [client.chat_json(msgs, JudgeReply, model=model, sample_index=j, **params) for msgs, model, j in specs]
        replies = client.run(coros, progress=bar_for(bars, f"{label}: {len(coros)} judge calls"))
    for (slot, pid, k, model, j), reply in zip(jobs, replies, strict=True):
        base = {"prompt_id": pid, "sample_index": k, "judge_index": j, "judge_model": model, "raw": reply.raw}
        parsed = reply.parsed if reply.ok else None
        if isinstance(parsed, JudgeReply):
            rows[slot] = Judgment(
                ok=True,
                similarity=parsed.similarity.score,
                precision=parsed.precision.score,
                similarity_reason=parsed.similarity.reason,
                precision_reason=parsed.precision.reason,
                **base,
            )
        else:
            rows[slot] = Judgment(ok=False, error=reply.error or "no valid judgment", **base)
    return [r for r in rows if r is not None]


def _run_batches(client: Client, specs: list[tuple[list[dict[str, str]], str, int]], params: dict[str, Any]) -> list[Any]:
    """One provider batch per judge model (a panel has several); replies in the order of `specs`."""
    replies: list[Any] = [None] * len(specs)
    for model in dict.fromkeys(m for _, m, _ in specs):
        idx = [i for i, (_, m, _) in enumerate(specs) if m == model]
        reqs = [(specs[i][0], JudgeReply, {"sample_index": specs[i][2]}) for i in idx]
        for i, reply in zip(idx, client.run_batch(reqs, model=model, **params), strict=True):
            replies[i] = reply
    return replies


def service_baseline(cfg: Config, client: Client, test: list[Example], bars: BarFactory | None = None) -> list[Completion]:
    """The service LLM's own fresh answers to the test prompts (K samples each), as
    prediction rows; judged like a round, they are the yardstick of performance matching.
    A failed call gives a row with `ok: false` and its error, which the judge records."""
    chosen = select_test(cfg, test)
    k = cfg.infer.num_samples
    coros = [
        client.chat_text(
            [m.chat() for m in ex.prompt_messages],
            model=cfg.service.model,
            temperature=cfg.infer.temperature,
            max_tokens=cfg.infer.max_new_tokens,
            sample_index=s,
            stage="baseline",
            round=None,
        )
        for ex in chosen
        for s in range(k)
    ]
    replies = client.run(coros, progress=bar_for(bars, f"baseline: {len(coros)} service answers")) if coros else []
    keys = [(ex.id, s) for ex in chosen for s in range(k)]
    return [
        Completion(prompt_id=pid, sample_index=s, text=reply.raw or "", model=cfg.service.model, ok=True)
        if reply.ok
        else Completion(prompt_id=pid, sample_index=s, text="", model=cfg.service.model, ok=False,
                        error=reply.error or "no answer")
        for (pid, s), reply in zip(keys, replies, strict=True)
    ]
