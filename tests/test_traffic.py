"""`run --from-shadow`: a round whose data is live traffic with the service's answers."""

from __future__ import annotations

import random

from llamaduo import loop
from llamaduo.artifacts import StageKey
from llamaduo.data import load_examples
from llamaduo.monitor_store import MonitorStore
from llamaduo.stages import Run
from llamaduo.store import RunStore
from tests.test_loop import make_config, responder, tiny_model  # noqa: F401  (the module's tiny model fixture)

WORDS = ("lamp river copper basket violet engine harbor pepper saddle quartz meadow lantern orbit tunnel "
         "walnut falcon marble ribbon cactus glacier anchor velvet thistle comet pebble spruce").split()


def live_traffic(store: RunStore, n: int, test_prompt: str) -> dict[int, float]:
    """n shadowed live requests with varied wording, judged; one repeats a test prompt verbatim."""
    rng = random.Random(5)
    ms = MonitorStore(store.monitor_db)
    scores = {}
    for i in range(n):
        prompt = test_prompt if i == 3 else " ".join(rng.sample(WORDS, 9)) + "?"
        pid = ms.add_pair([{"role": "user", "content": prompt}], "local guess", model="e2e", ts=float(i),
                          service_answer=" ".join(rng.sample(WORDS, 7)), service_model="fake-model")
        scores[pid] = float((i * 37) % 100)
        ms.set_judgment(pid, scores[pid], scores[pid], scores[pid], {"precision": "r"})
    ms.close()
    return scores


def test_run_from_shadow_adds_traffic_examples_with_lineage_and_extends_the_test_split(tmp_path, fake_service,
                                                                                         tiny_model):  # noqa: F811
    fake_service.responder = responder
    cfg = make_config(tmp_path, fake_service, tiny_model, loop={"max_rounds": 1}, serve={"shadow_test_share": 0.25})
    loop.run(cfg, display="quiet")
    store = RunStore(cfg.run_dir)
    base_test = load_examples(store.test_path)
    r0_predictions = store.predictions_path(0).read_bytes()
    scores = live_traffic(store, 24, base_test[0].prompt)

    result = loop.run(cfg, display="quiet", from_shadow=True)
    assert [r.round for r in result.rounds] == [0, 1]
    assert store.predictions_path(0).read_bytes() == r0_predictions  # round 0 keeps the split it was judged on

    train = load_examples(store.traffic_path(1))
    held = load_examples(store.traffic_path(1, "test"))
    assert train and held and len(train) + len(held) < 24  # the test prompt's pair is decontaminated away
    assert all(ex.lineage.source == "shadow" and ex.lineage.origin.startswith("shadow:") for ex in train + held)
    assert {ex.category for ex in train + held} == {"live"}
    ids = [int(ex.lineage.origin.split(":")[1]) for ex in train]
    assert [scores[i] for i in ids] == sorted(scores[i] for i in ids)  # lowest-scoring first
    rejected = store.traffic_path(1, "rejected").read_text()
    assert "test_contamination" in rejected

    run_ = Run(cfg)
    assert {ex.id for ex in train} <= {ex.id for ex in run_.train_set(1)}
    assert len(run_.test_set(1)) == len(base_test) + len(held) and len(run_.test_set(0)) == len(base_test)
    judged = {p.prompt_id for p in store.read_predictions(1)}
    assert {ex.id for ex in held} <= judged  # round 1 is judged on the extended split
    assert "live" in store.read_scores(1).per_category
    rec = store.read_manifest().stage(StageKey.step("traffic", 1))
    assert rec.status == "done" and rec.test == len(held) and rec.kept == len(train)
    assert store.read_manifest().rounds["r01"].synthetic_added == len(train)
