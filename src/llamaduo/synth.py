"""Synthetic training pairs from the service LLM, one seed pair per call (the paper's recipe).

`synthesize` makes ceil(n / pairs_per_call) calls. Seeds are drawn without replacement,
stratified by category (each category's share of calls follows its share of the seeds,
optionally tilted by `weights`, e.g. toward low-scoring categories), cycling through a
category again only once it is used up. Every returned pair is validated; rejected pairs and
failed calls come back as rows with a reason, accepted pairs as `Example`s with lineage
(round, seed id, generator model, template hash) and the seed's category and system prompt.

Seeds are exactly what the caller passes: the loop passes the train split, never the test split.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, field_validator

from llamaduo import prompts
from llamaduo.config import Config
from llamaduo.data import Example, Lineage, make_example
from llamaduo.errors import UserError
from llamaduo.reporting import BarFactory, bar_for
from llamaduo.similarity import normalize

if TYPE_CHECKING:
    from llamaduo.service import Client


class SynthPair(BaseModel):
    model_config = ConfigDict(extra="ignore")
    instruction: str = ""
    response: str = ""

    @field_validator("instruction", "response", mode="before")
    @classmethod
    def _as_text(cls, v: Any) -> Any:
        # A JSON task's answer often comes back as an object rather than a string: keep it as JSON text.
        if isinstance(v, (dict, list)):
            return json.dumps(v, ensure_ascii=False)
        return "" if v is None else v


class SynthPairs(BaseModel):
    """The JSON a synthesis call must reply with."""

    contents: list[SynthPair]


@dataclass
class SynthResult:
    examples: list[Example]
    rejected: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    failed_calls: int = 0  # calls the service never answered (after retries), as opposed to bad replies


def synth_template(cfg: Config) -> prompts.Template:
    return prompts.load("synth.jinja", cfg.synth.template, field="synth.template")


def render_synth_prompt(seed: Example, topic: str, n: int, template: prompts.Template | None = None) -> list[dict[str, str]]:
    """Chat messages asking for `n` new pairs like `seed`."""
    template = template or prompts.load("synth.jinja")
    return template.render(instruction=seed.prompt, response=seed.response, topic=topic, category=seed.category, n=n)


def pick_seeds(
    seeds: list[Example], calls: int, rng: random.Random, weights: dict[str, float] | None = None
) -> list[Example]:
    """One seed per call: categories get calls in proportion to (seeds in it × weight), by
    largest remainder; within a category seeds are drawn without replacement and reshuffled
    only when all were used. Calls are interleaved across categories, so trimming the result
    to `n` pairs keeps every category."""
    by_cat: dict[str, list[Example]] = defaultdict(list)
    for s in seeds:
        by_cat[s.category].append(s)
    cats = sorted(by_cat)
    known = [w for c, w in (weights or {}).items() if c in by_cat and w > 0]
    default_w = sum(known) / len(known) if known else 1.0  # categories the scores did not cover
    share = {c: len(by_cat[c]) * max(0.0, (weights or {}).get(c, default_w)) for c in cats}
    if sum(share.values()) <= 0:
        share = {c: float(len(by_cat[c])) for c in cats}
    total = sum(share.values())
    exact = {c: calls * share[c] / total for c in cats}
    quota = {c: math.floor(exact[c]) for c in cats}
    for c in sorted(cats, key=lambda c: (-(exact[c] - quota[c]), c))[: calls - sum(quota.values())]:
        quota[c] += 1

    drawn: dict[str, list[Example]] = {}
    for c in cats:
        out: list[Example] = []
        while len(out) < quota[c]:
            pool = list(by_cat[c])
            rng.shuffle(pool)
            out.extend(pool[: quota[c] - len(out)])
        drawn[c] = out
    order: list[Example] = []
    for i in range(max(quota.values(), default=0)):
        order.extend(drawn[c][i] for c in cats if i < len(drawn[c]))
    return order


def _reject(instruction: str, response: str, reason: str, seed: Example, round: int, **extra: Any) -> dict[str, Any]:
    return {"instruction": instruction, "response": response, "reason": reason, "seed_id": seed.id, "round": round, **extra}


def _problem(instruction: str, response: str, cfg: Config) -> str | None:
    lo, hi = cfg.synth.min_chars, cfg.synth.max_chars
    for name, text in (("instruction", instruction), ("response", response)):
        t = text.strip()
        if not t:
            return f"empty_{name}"
        if len(t) < lo:
            return f"{name}_too_short"
        if len(t) > hi:
            return f"{name}_too_long"
    return None


def synthesize(
    cfg: Config,
    client: Client,
    seeds: list[Example],
    n: int,
    round: int,
    rng: random.Random,
    weights: dict[str, float] | None = None,
    bars: BarFactory | None = None,
) -> SynthResult:
    """Ask the generator for `n` new pairs like `seeds`; validated, with lineage, trimmed to `n`."""
    if n <= 0:
        return SynthResult(examples=[])
    if not seeds:
        raise UserError("synthesis needs seed examples, and the train split is empty")
    per_call = cfg.synth.pairs_per_call
    calls = math.ceil(n / per_call)
    model = cfg.synth_model
    template = synth_template(cfg)
    chosen = pick_seeds(seeds, calls, rng, weights)
    prompts = [
        render_synth_prompt(seed, cfg.synth.topics.get(seed.category, seed.category), per_call, template)
        for seed in chosen
    ]
    params = {"model": model, "temperature": cfg.synth.temperature, "max_tokens": cfg.synth.max_tokens, "stage": "synth", "round": round}
    if cfg.service.use_batch:  # the provider's Batch API: same cache keys, discounted, slower
        replies = client.run_batch([(msgs, SynthPairs, {"sample_index": i}) for i, msgs in enumerate(prompts)], **params)
    else:
        # sample_index: calls with the same seed must not share a cache entry
        coros = [client.chat_json(msgs, SynthPairs, sample_index=i, **params) for i, msgs in enumerate(prompts)]
        replies = client.run(coros, progress=bar_for(bars, f"synth r{round:02d}: {calls} calls"))

    lineage = {"source": "synthetic", "round": round, "generator": model, "template_hash": template.hash}
    examples: list[Example] = []
    origin: list[Example] = []  # the seed of each accepted example
    rejected: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for seed, reply in zip(chosen, replies, strict=True):
        if not reply.ok or not isinstance(reply.parsed, SynthPairs):
            rejected.append(_reject("", "", "call_failed", seed, round, error=reply.error or "no valid reply"))
            continue
        if not reply.parsed.contents:
            rejected.append(_reject("", "", "no_pairs", seed, round, error="the reply held no pairs"))
        seed_key = (normalize(seed.prompt), normalize(seed.response))
        system = next((m.content for m in seed.messages if m.role == "system"), None)
        for pair in reply.parsed.contents:
            instruction, response = pair.instruction.strip(), pair.response.strip()
            reason = _problem(instruction, response, cfg)
            key = (normalize(instruction), normalize(response))
            if reason is None and (key[0] == seed_key[0] or key == seed_key):
                reason = "copy_of_seed"
            if reason is None and key in seen:
                reason = "duplicate_in_batch"
            if reason is not None:
                rejected.append(_reject(pair.instruction, pair.response, reason, seed, round))
                continue
            seen.add(key)
            origin.append(seed)
            examples.append(
                make_example(instruction, response, category=seed.category, system=system,
                             lineage=Lineage(seed_id=seed.id, **lineage))
            )
    for ex, seed in zip(examples[n:], origin[n:], strict=True):  # calls come in whole batches
        rejected.append(_reject(ex.prompt, ex.response, "surplus", seed, round))
    failed = sum(1 for r in replies if not r.ok and r.raw is None)
    return SynthResult(examples=examples[:n], rejected=rejected, calls=calls, failed_calls=failed)
