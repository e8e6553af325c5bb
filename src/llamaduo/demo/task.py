"""The demo's task and its simulated service LLM.

Task: turn a short customer message into JSON with the keys intent, name, city, item and
quantity — a task whose answers a program can check. Its answers follow `RESPONSE_FORMAT`
(a strict `json_schema`), which the demo sets as the task's `data.response_format`: inference,
acceptance and the served request decode under it. `make_pair` generates examples (the
shipped coverage file was written with it); `simulator_responder` plays the service LLM for
`llamaduo demo`: it writes new training pairs with the same generator (the answer as a JSON
object when the synthesis prompt shows the schema) and judges candidates in the paper's JSON
format with a deterministic checker against the reference.

It is a SIMULATOR, labelled as such wherever it appears: it stands in for a real provider so
the pipeline can be shown offline.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any

SIMULATOR_MODEL = "llamaduo-simulator"
INSTRUCTION = "Extract the request in this customer message as JSON with the keys intent, name, city, item and quantity."
KEYS = ("intent", "name", "city", "item", "quantity")

FIRST = "Maria Tom Aisha Lukas Mei Omar Sofia Jonas Priya Diego Hana Felix Nora Ivan Leila Sam Ana Kofi Elena Yusuf".split()
LAST = "Lopez Berg Khan Novak Chen Haddad Rossi Weber Nair Silva Sato Klein Moreau Petrov Amini Ward Costa Mensah Popa Demir".split()
CITIES = (
    "Lyon Porto Leeds Graz Osaka Tunis Turin Bremen Pune Quito Kyoto Ghent Nantes Split Lagos Cork Malmo Perth Bergen Izmir"
).split()
ITEMS = [
    "blue mug", "desk lamp", "notebook", "water bottle", "phone case", "wool scarf", "coffee grinder", "yoga mat",
    "backpack", "tea kettle", "wall clock", "plant pot", "bike light", "umbrella", "travel pillow", "cutting board",
]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}

TEMPLATES = {
    "order": [
        "Hi, I'm {name} from {city}. Please send me {qty} {items}.",
        "Hello! {name} here, in {city}. I would like to order {qty} {items}.",
        "Could you ship {qty} {items} to {city}? Thanks, {name}",
        "{name} ({city}): I want to buy {qty} {items}, please.",
        "Good morning, this is {name} writing from {city}. Can I get {qty} {items}?",
    ],
    "cancel": [
        "Hi, {name} from {city} here. Please cancel my order of {qty} {items}.",
        "I need to cancel the {qty} {items} I ordered. {name}, {city}",
        "Hello, this is {name} in {city}. I changed my mind about the {qty} {items}; cancel them please.",
        "{name} ({city}): cancel {qty} {items}, I no longer need them.",
    ],
    "return": [
        "Hello, I'm {name} from {city}. I want to return {qty} {items} that arrived damaged.",
        "{name} here ({city}). How do I send back {qty} {items}? They are the wrong size.",
        "Hi! The {qty} {items} I got in {city} are faulty, I'd like to return them. {name}",
        "This is {name}, {city}. Please arrange a return for {qty} {items}.",
    ],
}
SCHEMA = {
    "type": "object",
    "properties": {
        "intent": {"type": "string", "enum": sorted(TEMPLATES)},
        "name": {"type": "string"},
        "city": {"type": "string"},
        "item": {"type": "string"},
        "quantity": {"type": "integer"},
    },
    "required": list(KEYS),
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "order_request", "strict": True, "schema": SCHEMA}}
TOPICS = {
    "order": "customers asking to buy products",
    "cancel": "customers cancelling an order",
    "return": "customers returning products",
}


def make_pair(rng: random.Random, intent: str | None = None) -> tuple[str, str, str]:
    """One (prompt, response, category) example of the demo task."""
    intent = intent or rng.choice(sorted(TEMPLATES))
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    city = rng.choice(CITIES)
    item = rng.choice(ITEMS)
    qty = rng.randint(1, 9)
    qty_text = NUMBER_WORDS[qty] if rng.random() < 0.4 else str(qty)
    items = item if qty == 1 else item + "s"
    message = rng.choice(TEMPLATES[intent]).format(name=name, city=city, qty=qty_text, items=items)
    answer = {"intent": intent, "name": name, "city": city, "item": item, "quantity": qty}
    return f"{INSTRUCTION}\n\nMessage: {message}", json.dumps(answer), intent


def coverage_records(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    intents = sorted(TEMPLATES)
    out = []
    for i in range(n):
        prompt, response, category = make_pair(rng, intents[i % len(intents)])
        out.append({"id": f"demo-{i:04d}", "prompt": prompt, "response": response, "category": category})
    return out


# ------------------------------------------------------------------------- checker
def _parse_obj(text: str) -> dict[str, Any] | None:
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _f1(a: list[str], b: list[str]) -> float:
    if not a or not b:
        return 0.0
    common = 0
    pool = list(b)
    for t in a:
        if t in pool:
            pool.remove(t)
            common += 1
    if common == 0:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


def check(reference: str, candidate: str) -> tuple[int, int, str]:
    """Deterministic judge: (similarity, precision, reason), each score 1–100."""
    ref = _parse_obj(reference) or {}
    cand = _parse_obj(candidate)
    similarity = max(1, round(100 * _f1(_tokens(candidate), _tokens(reference))))
    if cand is None:
        # Partial credit for the right values in free text, so early rounds are not all 1s.
        found = [k for k in KEYS if k in ref and str(ref[k]).lower() in candidate.lower()]
        precision = max(1, round(30 * len(found) / len(KEYS)))
        return similarity, precision, f"not a JSON object; {len(found)}/{len(KEYS)} values present in the text"
    right = [k for k in KEYS if str(cand.get(k, "")).strip().lower() == str(ref.get(k, "")).strip().lower()]
    wrong = [k for k in KEYS if k not in right]
    precision = max(1, round(20 + 80 * len(right) / len(KEYS)))
    reason = f"valid JSON; {len(right)}/{len(KEYS)} fields correct" + (f" (wrong: {', '.join(wrong)})" if wrong else "")
    return similarity, precision, reason


# ----------------------------------------------------------------------- simulator
def _between(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}>\n?(.*?)\n?</{tag}>", text, re.S)
    return m.group(1) if m else None


def simulator_responder(request: dict[str, Any]) -> str:
    """Answer one chat-completions request body: a judgment, synthetic pairs, or an answer."""
    messages = request.get("messages") or []
    text = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    candidate = _between(text, "candidate")
    reference = _between(text, "reference")
    if candidate is not None and reference is not None:
        sim, prec, reason = check(reference, candidate)
        return json.dumps(
            {"similarity": {"score": sim, "reason": reason}, "precision": {"score": prec, "reason": reason}}
        )
    if '"contents"' in text:
        return json.dumps({"contents": _synthesize(text, messages)})
    # A plain task request (service baseline): answer it by reading the message.
    return json.dumps(_solve(text))


def _synthesize(text: str, messages: list[Any]) -> list[dict[str, Any]]:
    want = re.search(r"(\d+)\s+new", text)
    n = int(want.group(1)) if want else 5
    # The seed pair in the prompt carries its intent; new pairs keep the seed's category.
    seed_intent = re.search(r'"intent":\s*"(\w+)"', _between(text, "example_response") or text)
    intent = seed_intent.group(1) if seed_intent and seed_intent.group(1) in TEMPLATES else None
    as_object = "JSON Schema" in text  # the prompt asks for the answer as the JSON object itself
    # Seeded by the request itself: the same request always gets the same pairs (cache and
    # resume stay consistent), different seeds/variations get different pairs.
    rng = random.Random(hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest())
    out = []
    for _ in range(min(n, 20)):
        prompt, response, _cat = make_pair(rng, intent)
        out.append({"instruction": prompt, "response": json.loads(response) if as_object else response})
    return out


def _solve(text: str) -> dict[str, Any]:
    msg = text.split("Message:", 1)[-1]
    low = msg.lower()
    intent = "cancel" if "cancel" in low else "return" if ("return" in low or "send back" in low) else "order"
    name = next((f"{f} {la}" for f in FIRST for la in LAST if f"{f} {la}" in msg), "")
    city = next((c for c in CITIES if c in msg), "")
    item = next((i for i in sorted(ITEMS, key=len, reverse=True) if i in low), "")
    qty_m = re.search(r"\b(\d+)\b", msg)
    qty = int(qty_m.group(1)) if qty_m else next((k for k, w in NUMBER_WORDS.items() if re.search(rf"\b{w}\b", low)), 1)
    return {"intent": intent, "name": name, "city": city, "item": item, "quantity": qty}
