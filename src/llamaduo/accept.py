"""`llamaduo accept`: judge what is actually served, and compare it with the best round.

The SERVED artifact (any OpenAI-compatible endpoint: `llamaduo serve`, vLLM, llama.cpp,
Ollama) answers the test split and is judged with the run's protocol; a paired bootstrap over
the shared test prompts gives the difference from the best round with a 95% CI, so a broken
export or a server-side template mismatch shows up as a score drop.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from llamaduo.artifacts import Completion, Judgment
from llamaduo.config import Config
from llamaduo.data import Example, FunctionCall, Message, ToolCall, load_examples
from llamaduo.deploy import pick_round
from llamaduo.errors import UserError
from llamaduo.evaluate import evaluate
from llamaduo.files import write_json
from llamaduo.scoring import evaluate_pass
from llamaduo.store import RunStore

if TYPE_CHECKING:
    from llamaduo.service import Client


class AcceptResult(BaseModel):
    endpoint: str
    model: str
    round: int
    metric: str
    statistic: str
    served_value: float
    round_value: float
    difference: float
    ci_low: float
    ci_high: float
    prompts: int
    candidates: int
    passed: bool | None = None
    scores_path: Path

    def summary(self) -> str:
        ci_has_zero = self.ci_low <= 0 <= self.ci_high
        verdict = (
            "no significant difference from the round" if ci_has_zero
            else ("the served model scores LOWER than the round" if self.ci_high < 0
                  else "the served model scores higher than the round")
        )
        lines = [
            f"served {self.model} at {self.endpoint}: {self.metric} {self.statistic} {self.served_value:.1f} "
            f"vs round r{self.round:02d} {self.round_value:.1f} ({self.prompts} prompts, {self.candidates} candidates)",
            f"difference {self.difference:+.1f} (95% CI {self.ci_low:+.1f} to {self.ci_high:+.1f}): {verdict}",
        ]
        if self.passed is not None:
            lines.append(f"pass rule on the served model: {'passed' if self.passed else 'not passed'}")
        lines.append(f"scores: {self.scores_path}")
        return "\n".join(lines)


def candidate_scores(judgments: list[Judgment], metric: str) -> dict[str, list[float]]:
    """Per prompt: each candidate's mean score over its successful judgments."""
    from llamaduo.scoring import candidate_means

    out: dict[str, list[float]] = {}
    for (pid, _), v in sorted(candidate_means(judgments)[metric].items()):
        out.setdefault(pid, []).append(v)
    return out


def statistic(values: list[float], name: str) -> float:
    import numpy as np

    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return float("nan")
    if name == "mean":
        return float(a.mean())
    if name == "median":
        return float(np.median(a))
    if name.startswith("coverage@"):
        return float(100.0 * (a >= float(name.split("@")[1])).mean())
    raise ValueError(f"unknown statistic {name}")


def paired_bootstrap(served: dict[str, list[float]], ref: dict[str, list[float]], stat: str, seed: int,
                     resamples: int = 1000) -> tuple[float, float, float]:
    """Difference served − ref of a statistic, with a 95% CI from resampling the shared prompts."""
    import numpy as np

    pids = sorted(set(served) & set(ref))
    if not pids:
        raise UserError("accept: the served model and the round have no judged test prompts in common")
    diff = statistic([v for p in pids for v in served[p]], stat) - statistic([v for p in pids for v in ref[p]], stat)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        pick = [pids[i] for i in rng.integers(0, len(pids), len(pids))]
        s = statistic([v for p in pick for v in served[p]], stat)
        r = statistic([v for p in pick for v in ref[p]], stat)
        draws.append(s - r)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(diff), float(lo), float(hi)


def request_of(ex: Example, dialect: str = "openai") -> dict[str, Any]:
    """What the application sends for a test prompt: its turns (tool turns included) and the
    structured-output fields of its task (tools, tool_choice, parallel_tool_calls, response_format).

    `dialect` "llama.cpp": its server takes a schema as `{"type": "json_object", "schema": ...}` and
    refuses OpenAI's `json_schema` type, so the same constraint is sent in its form."""
    fields = ex.request_fields()
    fmt = fields.get("response_format")
    if dialect == "llama.cpp" and isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fields["response_format"] = {"type": "json_object", "schema": (fmt.get("json_schema") or {}).get("schema")}
    return {"messages": [m.openai() for m in ex.prompt_messages], **fields}


def answer_text(message: Any) -> str:
    """A served answer as the infer stage writes one: its content, then each tool call as a
    `<tool_call>` block (`data.Message.text`), so exact metrics and the judge read both alike."""
    calls = [ToolCall(id=c.id or f"call_{i}", function=FunctionCall(name=c.function.name, arguments=c.function.arguments))
             for i, c in enumerate(getattr(message, "tool_calls", None) or [])]
    return Message(role="assistant", content=message.content or "", tool_calls=calls or None).text


async def _sample_endpoint(endpoint: str, api_key: str, model: str, test: list[Example], cfg: Config,
                           concurrency: int, extra_body: dict[str, Any] | None = None,
                           dialect: str = "openai") -> list[Completion]:
    import openai

    k = cfg.infer.num_samples
    client = openai.AsyncOpenAI(base_url=endpoint, api_key=api_key, max_retries=3, timeout=600)
    sem = asyncio.Semaphore(concurrency)

    async def ask(ex: Example, n: int, seed: int) -> list[Any]:
        async with sem:
            r = await client.chat.completions.create(
                model=model,
                **request_of(ex, dialect),
                temperature=cfg.infer.temperature,
                top_p=cfg.infer.top_p,
                max_tokens=cfg.infer.max_new_tokens,
                stop=cfg.infer.stop or None,
                n=n,
                seed=seed,
                extra_body=extra_body,
            )
            return list(r.choices)

    async def one(ex: Example) -> list[Completion]:
        choices = await ask(ex, k, cfg.seed)
        while len(choices) < k:  # servers that ignore `n` answer one choice per call
            choices += await ask(ex, 1, cfg.seed + len(choices))
        return [
            Completion(prompt_id=ex.id, sample_index=i, text=answer_text(c.message),
                       finish_reason=c.finish_reason or "stop", model=model, served_by=endpoint)
            for i, c in enumerate(choices[:k])
        ]

    try:
        rows = await asyncio.gather(*[one(ex) for ex in test])
    finally:
        await client.close()
    return [row for group in rows for row in group]


def accept(cfg: Config, store: RunStore, endpoint: str, client: Client, *, model: str | None = None,
           api_key: str | None = None, round: int | None = None, concurrency: int = 16,
           extra_body: dict[str, Any] | None = None, dialect: str = "openai") -> AcceptResult:
    """Judge the model served at `endpoint` like a round and compare it with the best round.

    `extra_body`: request fields beyond OpenAI's the server needs to sample as the run did
    (llama.cpp: its repeat penalty, min_p and top_k switched to transformers' behaviour)."""
    import openai

    from llamaduo import judge as judge_mod

    r = pick_round(store, round)
    ref_path = store.judgments_path(r)
    if not ref_path.exists():
        raise UserError(f"{ref_path}: round {r} has not been judged; nothing to compare the served model with")
    api_key = api_key or (os.environ.get(cfg.serve.api_key_env) if cfg.serve.api_key_env else None) or "not-needed"
    if model is None:
        try:
            model = openai.OpenAI(base_url=endpoint, api_key=api_key, max_retries=1).models.list().data[0].id
        except (openai.OpenAIError, IndexError) as e:
            raise UserError(f"{endpoint}: cannot list models ({type(e).__name__}); pass the model name") from None
    # Only the prompts the judge will see (judge.max_test_prompts) are worth asking for.
    test = judge_mod.select_test(cfg, load_examples(store.test_path))
    preds = asyncio.run(_sample_endpoint(endpoint, api_key, model, test, cfg, concurrency, extra_body, dialect))
    ev = evaluate(cfg, client, store, "accept", test, preds)

    rule = cfg.judge.pass_rule.judged()  # the judge's scores are compared; the verdict reads the whole rule
    served = candidate_scores(store.read_judgments("accept"), rule.metric)
    ref = candidate_scores(store.read_judgments(r), rule.metric)
    diff, lo, hi = paired_bootstrap(served, ref, rule.statistic, cfg.seed)
    pids = sorted(set(served) & set(ref))
    baseline = store.read_scores("baseline") if store.scores_path("baseline").exists() else None
    passed = bool(evaluate_pass(ev.scores, cfg.judge.pass_rule, baseline).passed)
    result = AcceptResult(
        endpoint=endpoint,
        model=model,
        round=r,
        metric=rule.metric,
        statistic=rule.statistic,
        served_value=statistic([v for p in pids for v in served[p]], rule.statistic),
        round_value=statistic([v for p in pids for v in ref[p]], rule.statistic),
        difference=diff,
        ci_low=lo,
        ci_high=hi,
        prompts=len(pids),
        candidates=len(preds),
        passed=passed,
        scores_path=ev.scores_path,
    )
    write_json(store.accept_comparison_path, result.model_dump(mode="json"))
    store.set_ledger(client.ledger())
    return result
