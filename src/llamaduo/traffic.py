"""Retraining from what users really ask: shadowed live prompts with the service LLM's answers.

`llamaduo run CONFIG --from-shadow` starts a round whose new data (the `traffic` stage, in
synthesis's place) is the live prompts of the monitoring store, each with the service's answer
as the response, the lowest-scoring first (where the student is furthest from the service). A
seeded share (`serve.shadow_test_share`, chosen per pair id so reruns agree) is held out and
extends the test split from this round on; the rest is cleaned like synthetic data (dedup +
decontamination against the extended test split). Both carry `Lineage(source="shadow",
origin="shadow:<pair id>")` and the category "live", so every score from this round on can be
read with and without live prompts (`per_category`), and earlier rounds keep the split they were
judged on. A pair used by an earlier traffic round is not used again.
"""

from __future__ import annotations

import hashlib
import json

from llamaduo.data import Example, Lineage, Message, content_id, load_examples
from llamaduo.errors import UserError
from llamaduo.monitor_store import MonitorStore, Pair
from llamaduo.store import RunStore

LIVE_CATEGORY = "live"


def live_pairs(store: RunStore) -> list[Pair]:
    """Shadow pairs with a service answer, lowest judged score first, then the unjudged ones."""
    if not store.monitor_db.exists():
        raise UserError(f"{store.root}: no monitoring data ({store.monitor_db.name}); "
                        "serve with `llamaduo serve RUN_DIR --shadow RATE` before `run --from-shadow`")
    ms = MonitorStore(store.monitor_db)
    try:
        pairs = [p for p in ms.pairs() if p.service_answer and p.service_answer.strip()
                 and any(m["role"] == "user" for m in p.messages)]
    finally:
        ms.close()
    return sorted(pairs, key=lambda p: (p.score is None, p.score if p.score is not None else 0.0, p.id))


def pairs_hash(pairs: list[Pair]) -> str:
    """What the traffic stage's output depends on: the pairs, their answers and their order."""
    blob = json.dumps([[p.id, p.messages, p.service_answer, p.score] for p in pairs], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def held_out(pair_id: int, seed: int, share: float) -> bool:
    """A stable draw per pair: the same pairs are test items on every rerun."""
    h = int(hashlib.sha256(f"{seed}:{pair_id}".encode()).hexdigest()[:12], 16)
    return h / float(16**12) < share


def used_origins(store: RunStore, before: int) -> set[str]:
    """`shadow:<id>` of every pair an earlier traffic round already used (train or test)."""
    out: set[str] = set()
    for k in range(1, before):
        for part in ("train", "test"):
            p = store.traffic_path(k, part)  # type: ignore[arg-type]
            if p.exists():
                out |= {ex.lineage.origin for ex in load_examples(p) if ex.lineage.origin}
    return out


def to_example(p: Pair, r: int) -> Example:
    msgs = [Message(role=m["role"], content=m["content"]) for m in p.messages]  # type: ignore[arg-type]
    msgs.append(Message(role="assistant", content=p.service_answer or ""))
    lineage = Lineage(source="shadow", origin=f"shadow:{p.id}", round=r, generator=p.service_model)
    return Example(id=content_id(msgs), messages=msgs, category=LIVE_CATEGORY, lineage=lineage)


def split_traffic(pairs: list[Pair], r: int, seed: int, share: float,
                  exclude: set[str] = frozenset()) -> tuple[list[Example], list[Example]]:  # type: ignore[assignment]
    """(train candidates in the pairs' order, held-out test items) of round r."""
    train: list[Example] = []
    test: dict[str, Example] = {}  # one test item per distinct live prompt and answer
    for p in pairs:
        if f"shadow:{p.id}" in exclude:
            continue
        ex = to_example(p, r)
        if held_out(p.id, seed, share):
            test.setdefault(ex.id, ex)
        else:
            train.append(ex)
    return train, list(test.values())
