"""The demo's tool-calling task and its simulated service LLM (`llamaduo demo --task tools`).

Task: route a customer message to one of three functions of an order desk, with its arguments:
`track_order(order_id)`, `refund_order(order_id, reason)` (reason one of `REASONS`) and
`change_address(order_id, city)`. Every request offers the three tools with `tool_choice:
"required"` and `parallel_tool_calls: false`, so an answer is exactly one call. `make_record`
generates examples in OpenAI's fine-tuning format (the shipped `data/tools.jsonl` was written
with `write_coverage`; `python -m llamaduo.demo.tools_task` writes it again), `check` scores a
candidate's call against the reference call, and `simulator_responder` plays the service LLM:
it writes new pairs (calls, in synthesis' structured reply form) with the same generator and
judges candidates with `check`.

It is a SIMULATOR, labelled as such wherever it appears: it stands in for a real provider so
the pipeline can be shown offline.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

from llamaduo.demo.task import CITIES, FIRST, ITEMS, LAST, _between, _f1, _tokens
from llamaduo.tools import parse_tool_calls, tool_call_text, tools_text

REASONS = ("damaged", "wrong_item", "late", "not_needed")


def _function(name: str, description: str, **properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}}}


_ORDER_ID = {"type": "string", "description": "the order number"}
# No apostrophes anywhere: the printed curl command quotes its body in single quotes.
TOOLS = [
    _function("track_order", "Where an order is now", order_id=_ORDER_ID),
    _function("refund_order", "Refund an order", order_id=_ORDER_ID, reason={"type": "string", "enum": list(REASONS)}),
    _function("change_address", "Send an order to another city", order_id=_ORDER_ID, city={"type": "string"}),
]
NAMES = {t["function"]["name"] for t in TOOLS}
REQUEST_FIELDS: dict[str, Any] = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
TOPICS = {
    "track_order": "customers asking where their order is",
    "refund_order": "customers asking for their money back",
    "change_address": "customers asking to deliver an order to another city",
}

TEMPLATES = {
    "track_order": [
        "Hi, where is my order {oid}? It has not arrived yet. {name}",
        "Can you tell me the status of order {oid}, please?",
        "Hello, this is {name}. Any news on order {oid}?",
        "My {item} (order {oid}) is late. Where is it now?",
        "Order {oid}: has it shipped yet? Thanks, {name}",
    ],
    "refund_order": [
        "Hi, I'm {name}. Order {oid}: {why}. I want my money back.",
        "Please refund order {oid}, {why}.",
        "Refund order {oid} please: {why}. {name}",
        "Hello, I would like a refund for order {oid} because {why}.",
    ],
    "change_address": [
        "Hi, this is {name}. Please send order {oid} to {city} instead.",
        "I moved to {city}. Can you deliver order {oid} there?",
        "Order {oid}: please change the address to {city}. Thanks, {name}",
        "Could my {item} (order {oid}) go to {city} instead? {name}",
    ],
}
# How a message gives each refund reason, and the words the simulated service reads it by.
WHY = {
    "damaged": ["it arrived broken", "the {item} is damaged", "it came cracked"],
    "wrong_item": ["you sent the wrong item", "it is not the {item} I ordered", "I got a different model"],
    "late": ["it came two weeks late", "it arrived far too late", "it was a month late"],
    "not_needed": ["I no longer need it", "I do not need the {item} any more"],
}
CUES = {
    "damaged": ("broken", "damaged", "cracked"),
    "wrong_item": ("wrong item", "not the", "different model"),
    "late": ("weeks late", "too late", "month late"),
    "not_needed": ("no longer need", "do not need"),
}


def make_call(rng: random.Random, function: str | None = None) -> tuple[str, str, dict[str, Any]]:
    """One (customer message, function, arguments) of the task."""
    function = function or rng.choice(sorted(TEMPLATES))
    oid = str(rng.randint(10000, 99999))
    args: dict[str, Any] = {"order_id": oid}
    fill = {"oid": oid, "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "item": rng.choice(ITEMS), "city": "", "why": ""}
    if function == "refund_order":
        args["reason"] = rng.choice(REASONS)
        fill["why"] = rng.choice(WHY[args["reason"]]).format(item=fill["item"])
    elif function == "change_address":
        args["city"] = fill["city"] = rng.choice(CITIES)
    return rng.choice(TEMPLATES[function]).format(**fill), function, args


def record(message: str, function: str, arguments: dict[str, Any], rid: str | None = None) -> dict[str, Any]:
    """A coverage record in OpenAI's fine-tuning format: the message, the assistant's call, the tools."""
    call = {"id": "call_0", "type": "function", "function": {"name": function, "arguments": json.dumps(arguments)}}
    rec: dict[str, Any] = {"id": rid} if rid else {}
    rec.update(messages=[{"role": "user", "content": message}, {"role": "assistant", "content": None, "tool_calls": [call]}],
               category=function, **REQUEST_FIELDS)
    return rec


def coverage_records(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` records, the functions in turn."""
    rng = random.Random(seed)
    functions = sorted(TEMPLATES)
    return [record(*make_call(rng, functions[i % len(functions)]), rid=f"tools-{i:04d}") for i in range(n)]


COVERAGE_RECORDS, COVERAGE_SEED = 200, 16  # what the shipped file holds


def write_coverage(path: Path, n: int = COVERAGE_RECORDS, seed: int = COVERAGE_SEED) -> Path:
    """Write the coverage file (the shipped `data/tools.jsonl` is `write_coverage(path)`)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in coverage_records(n, seed)), encoding="utf-8")
    return path


def tokenizer_corpus() -> str:
    """Text for the tiny student's tokenizer (`demo --quick`): the tools block every prompt starts
    with and some messages and calls, so a prompt is a few hundred tokens instead of a thousand."""
    rng = random.Random(0)
    samples = [make_call(rng, f) for f in sorted(TEMPLATES) for _ in range(20)]
    return "\n".join([tools_text(TOOLS), *(f"{m}\n{tool_call_text(f, a)}" for m, f, a in samples)])


# ------------------------------------------------------------------------- checker
def _one_call(text: str) -> tuple[str, dict[str, Any]] | None:
    calls = parse_tool_calls(text, NAMES)[1]
    if not calls:
        return None
    return calls[0]["function"]["name"], json.loads(calls[0]["function"]["arguments"])


def check(reference: str, candidate: str) -> tuple[int, int, str]:
    """Deterministic judge of a candidate call against the reference call (both as the model
    writes them): (similarity, precision, reason), each score 1-100."""
    ref = _one_call(reference)
    cand = _one_call(candidate)
    similarity = max(1, round(100 * _f1(_tokens(candidate), _tokens(reference))))
    if ref is None:
        return similarity, 1, "the reference makes no call"
    if cand is None:
        return similarity, 1, "no call to an offered function"
    (rname, rargs), (cname, cargs) = ref, cand
    right = [k for k in rargs if str(cargs.get(k, "")).strip().lower() == str(rargs[k]).strip().lower()]
    wrong = [k for k in rargs if k not in right]
    share = len(right) / len(rargs)
    if cname != rname:
        # The wrong function, however right its order id, does the wrong thing.
        return similarity, max(1, round(10 + 20 * share)), f"calls {cname}, the request needs {rname}"
    precision = round(40 + 60 * share) if len(cargs) == len(rargs) else round(40 + 50 * share)
    reason = f"calls {cname}; {len(right)}/{len(rargs)} arguments correct" + (f" (wrong: {', '.join(wrong)})" if wrong else "")
    return similarity, precision, reason


# ----------------------------------------------------------------------- simulator
def simulator_responder(request: dict[str, Any]) -> str:
    """Answer one chat-completions request body: a judgment, synthetic pairs, or a call."""
    messages = request.get("messages") or []
    text = "\n".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
    candidate, reference = _between(text, "candidate"), _between(text, "reference")
    if candidate is not None and reference is not None:
        sim, prec, reason = check(reference, candidate)
        return json.dumps({"similarity": {"score": sim, "reason": reason}, "precision": {"score": prec, "reason": reason}})
    if '"contents"' in text:
        return json.dumps({"contents": _synthesize(text, messages)})
    # A plain task request (service baseline): the call, as the model writes it.
    name, args = solve(text)
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


def _synthesize(text: str, messages: list[Any]) -> list[dict[str, Any]]:
    want = re.search(r"(\d+)\s+new", text)
    n = int(want.group(1)) if want else 5
    # The seed's call (shown in the reply's form) names its function; new pairs keep it.
    seed = re.search(r'"name":\s*"(\w+)"', _between(text, "example_response") or "")
    function = seed.group(1) if seed and seed.group(1) in TEMPLATES else None
    # Seeded by the request itself: the same request always gets the same pairs.
    rng = random.Random(hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest())
    out = []
    for _ in range(min(n, 20)):
        message, name, args = make_call(rng, function)
        out.append({"instruction": message, "tool_calls": [{"name": name, "arguments": args}]})
    return out


def solve(text: str) -> tuple[str, dict[str, Any]]:
    """The call a careful reader makes for a message (the simulated service's own answer)."""
    low = text.lower()
    oid_m = re.findall(r"\b(\d{5})\b", text)
    oid = oid_m[-1] if oid_m else ""
    city = next((c for c in CITIES if re.search(rf"\b{c}\b", text)), None)
    for reason, cues in CUES.items():
        if any(c in low for c in cues):
            return "refund_order", {"order_id": oid, "reason": reason}
    if city is not None and ("instead" in low or "address" in low or "moved" in low):
        return "change_address", {"order_id": oid, "city": city}
    return "track_order", {"order_id": oid}


if __name__ == "__main__":  # regenerate the shipped coverage file: python -m llamaduo.demo.tools_task [path]
    default = Path(__file__).parent / "data" / "tools.jsonl"
    print(write_coverage(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
