"""Synthetic training pairs from the service LLM, one seed pair per call (the paper's recipe).

`synthesize` makes ceil(n / pairs_per_call) calls. Seeds are drawn without replacement,
stratified by category (each category's share of calls follows its share of the seeds,
optionally tilted by `weights`, e.g. toward low-scoring categories), cycling through a
category again only once it is used up. Every returned pair is validated; rejected pairs and
failed calls come back as rows with a reason, accepted pairs as `Example`s with lineage
(round, seed id, generator model, template hash) and the seed's category and system prompt.

A structured seed (see `data.Example.structured`) asks for pairs in its own structure: the prompt
shows the functions it offers and how answers call them, or its response schema. A tool task's
reply pair is `{"instruction": ..., "tool_calls": [{"name": ..., "arguments": {...}}]}` (or
`"response"` text for an answer without a call, where `tool_choice` allows one); a schema task's
`"response"` is the JSON object itself. New examples carry the seed's `tools`, `tool_choice`,
`parallel_tool_calls` and `response_format`, and a pair whose target does not fit them
(`structure.answer_problem`) is rejected as `invalid_structure` with the why in its `error`.

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

from llamaduo import prompts, structure
from llamaduo.config import Config
from llamaduo.data import Example, FunctionCall, Lineage, Message, ToolCall, content_id, make_example
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


class SynthCall(BaseModel):
    """One function call of a structured pair; `arguments` kept as JSON text, as OpenAI sends it."""

    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str = "{}"

    @field_validator("arguments", mode="before")
    @classmethod
    def _as_json(cls, v: Any) -> Any:
        # Asked for as an object; a JSON string of one (OpenAI's own wire form) is the same call.
        return "{}" if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


class StructuredPair(SynthPair):
    """A pair of a tool task: the target is `tool_calls`, or `response` text for an answer without a call."""

    tool_calls: list[SynthCall] = []

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> Any:
        return [] if v is None else v


class StructuredPairs(BaseModel):
    """The reply of a synthesis call for a structured seed (its pairs may carry calls)."""

    contents: list[StructuredPair]


@dataclass
class SynthResult:
    examples: list[Example]
    rejected: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    failed_calls: int = 0  # calls the service never answered (after retries), as opposed to bad replies


def synth_template(cfg: Config) -> prompts.Template:
    return prompts.load("synth.jinja", cfg.synth.template, field="synth.template")


def _data_json(value: Any) -> str:
    """JSON for the prompt; `<` escaped (the same JSON) so no text in it can open or close a tag."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")


def structure_context(seed: Example) -> dict[str, Any]:
    """The template variables of a structured seed: the functions it offers and how answers call
    them, or its response schema; a tool seed's target in the reply's own form. Empty for plain text."""
    if not seed.structured:
        return {}
    fmt, _, choice, name = structure.parsed(seed)
    shown = structure.prompt_tools(seed) or []
    ctx: dict[str, Any] = {
        "tools": "\n".join(_data_json(t) for t in shown),
        "tool_choice": name or ("required" if choice == "required" else "auto"),
        "one_call": seed.parallel_tool_calls is False,
        "response_schema": _data_json(fmt[0]) if fmt is not None and not shown else "",
    }
    target = seed.messages[-1]
    if shown:
        reply: dict[str, Any] = {"response": target.content} if target.content else {}
        reply["tool_calls"] = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)}
                               for c in target.tool_calls or []]
        ctx["response"] = _data_json(reply)
    return ctx


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def render_synth_prompt(seed: Example, topic: str, n: int, template: prompts.Template | None = None) -> list[dict[str, str]]:
    """Chat messages asking for `n` new pairs like `seed` (for a structured seed, in its structure)."""
    template = template or prompts.load("synth.jinja")
    ctx: dict[str, Any] = {"tools": "", "tool_choice": "auto", "one_call": False, "response_schema": "",
                           "instruction": seed.prompt, "response": seed.response, "topic": topic,
                           "category": seed.category, "n": n}
    return template.render(**{**ctx, **structure_context(seed)})


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


def _target(pair: SynthPair) -> Message:
    """A pair's target turn: its text, and the calls a structured pair makes."""
    calls = [ToolCall(id=f"call_{i}", function=FunctionCall(name=c.name.strip(), arguments=c.arguments))
             for i, c in enumerate(getattr(pair, "tool_calls", []))]
    return Message(role="assistant", content=pair.response.strip(), tool_calls=calls or None)


def _like(seed: Example, instruction: str, target: Message, system: str | None, lineage: Lineage) -> Example:
    """A new example of the seed's task: its system prompt and category, and for a structured
    seed the request fields its application sends (tools, tool choice, response format)."""
    if not seed.structured:
        return make_example(instruction, target.content, category=seed.category, system=system, lineage=lineage)
    msgs = [*([Message(role="system", content=system)] if system else []), Message(role="user", content=instruction), target]
    fields = seed.request_fields()
    return Example(id=content_id(msgs, fields), messages=msgs, category=seed.category, lineage=lineage, **fields)


def _structure_problem(seed: Example, example: Example) -> str | None:
    """Why a synthetic example's target is not valid for its seed's task (`structure.answer_problem`
    on the answer as the model would write it, then the example's own checks), or None."""
    if not seed.structured:
        return None
    why = structure.answer_problem(seed, example.response)
    if why is None:
        found = structure.check(example)
        why = f"{found[0][0]}: {found[0][1]}" if found and found[0][0] else found[0][1] if found else None
    return why


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
    # A tool seed's pairs may answer with calls; every other seed keeps the plain reply (and its cache keys).
    schemas = [StructuredPairs if structure_context(seed).get("tools") else SynthPairs for seed in chosen]
    if cfg.service.use_batch:  # the provider's Batch API: same cache keys, discounted, slower
        replies = client.run_batch([(msgs, schema, {"sample_index": i})
                                    for i, (msgs, schema) in enumerate(zip(prompts, schemas, strict=True))], **params)
    else:
        # sample_index: calls with the same seed must not share a cache entry
        coros = [client.chat_json(msgs, schema, sample_index=i, **params)
                 for i, (msgs, schema) in enumerate(zip(prompts, schemas, strict=True))]
        replies = client.run(coros, progress=bar_for(bars, f"synth r{round:02d}: {calls} calls"))

    lineage = {"source": "synthetic", "round": round, "generator": model, "template_hash": template.hash}
    examples: list[Example] = []
    origin: list[Example] = []  # the seed of each accepted example
    rejected: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for seed, reply in zip(chosen, replies, strict=True):
        if not reply.ok or not isinstance(reply.parsed, (SynthPairs, StructuredPairs)):
            rejected.append(_reject("", "", "call_failed", seed, round, error=reply.error or "no valid reply"))
            continue
        if not reply.parsed.contents:
            rejected.append(_reject("", "", "no_pairs", seed, round, error="the reply held no pairs"))
        seed_key = (normalize(seed.prompt), normalize(seed.response))
        system = next((m.content for m in seed.messages if m.role == "system"), None)
        for pair in reply.parsed.contents:
            instruction, target = pair.instruction.strip(), _target(pair)
            response = target.text.strip()
            written = target.text if target.tool_calls else pair.response  # as the reply gave it
            reason = _problem(instruction, response, cfg)
            key = (normalize(instruction), normalize(response))
            if reason is None and (key[0] == seed_key[0] or key == seed_key):
                reason = "copy_of_seed"
            if reason is None and key in seen:
                reason = "duplicate_in_batch"
            if reason is not None:
                rejected.append(_reject(pair.instruction, written, reason, seed, round))
                continue
            example = _like(seed, instruction, target, system, Lineage(seed_id=seed.id, **lineage))
            why = _structure_problem(seed, example)
            if why is not None:  # the pair's target does not fit the task's tools or schema
                rejected.append(_reject(pair.instruction, written, "invalid_structure", seed, round, error=why))
                continue
            seen.add(key)
            origin.append(seed)
            examples.append(example)
    for ex, seed in zip(examples[n:], origin[n:], strict=True):  # calls come in whole batches
        rejected.append(_reject(ex.prompt, ex.response, "surplus", seed, round))
    failed = sum(1 for r in replies if not r.ok and r.raw is None)
    return SynthResult(examples=examples[:n], rejected=rejected, calls=calls, failed_calls=failed)
