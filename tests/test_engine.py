"""The stage engine: run / skip / invalidate decided once, and what it records."""

import pytest

from llamaduo.artifacts import ROUND_STEPS, StageKey
from llamaduo.engine import Engine, Outcome
from llamaduo.errors import UserError
from llamaduo.store import RunStore


def make(tmp_path):
    store = RunStore(tmp_path)
    store.init_manifest(seed=1)
    events: list[dict] = []
    return store, events, Engine(store, events.append)


def test_stage_keys_have_one_declared_order():
    assert ROUND_STEPS == ("synth", "train", "infer", "judge")
    assert str(StageKey.step("train", 3)) == "r03/train"
    assert StageKey.parse("r03/train") == StageKey.step("train", 3)
    assert StageKey.parse("prepare").round is None
    chain = [StageKey.step("judge", 1)]
    while (prev := chain[-1].previous()) is not None:
        chain.append(prev)
    assert [str(k) for k in chain] == [
        "r01/judge", "r01/infer", "r01/train", "r01/synth", "r00/judge", "r00/infer", "r00/train", "prepare"
    ]


def test_a_done_stage_with_the_same_inputs_and_outputs_is_skipped(tmp_path):
    store, events, engine = make(tmp_path)
    out = tmp_path / "out.txt"
    calls = []

    def work(_):
        calls.append(1)
        out.write_text("x")
        return Outcome("made it", {"examples": 3})

    key = StageKey.step("train", 0)
    h1 = engine.run(key, {"train": {"lr": 1}}, [out], work)
    h2 = engine.run(key, {"train": {"lr": 1}}, [out], work)
    assert h1 == h2 and calls == [1]
    rec = store.stage_record(key)
    assert rec.status == "done" and rec.examples == 3 and rec.seconds is not None
    assert [e["event"] for e in events] == ["stage_start", "stage_done", "stage_skip"]


def test_changed_inputs_rerun_the_stage_and_name_the_component(tmp_path):
    store, events, engine = make(tmp_path)
    key = StageKey.step("infer", 0)
    engine.run(key, {"infer": {"k": 1}, "test": "h"}, [], lambda d: Outcome())
    seen = []
    engine.run(key, {"infer": {"k": 2}, "test": "h"}, [], lambda d: seen.append(d.previous.inputs_hash) or Outcome())
    assert seen  # ran again, and saw the record of the earlier inputs
    inval = [e for e in events if e["event"] == "invalidated"]
    assert inval == [{"event": "invalidated", "stage": "r00/infer", "round": 0, "changed": ["infer"]}]


def test_missing_outputs_rerun_a_done_stage(tmp_path):
    store, events, engine = make(tmp_path)
    out = tmp_path / "gone.txt"
    n = []
    engine.run(StageKey(name="prepare"), {"a": "1"}, [out], lambda d: n.append(1) or Outcome())
    engine.run(StageKey(name="prepare"), {"a": "1"}, [out], lambda d: n.append(1) or Outcome())
    assert n == [1, 1]


def test_a_failing_stage_is_recorded_failed_and_reruns(tmp_path):
    store, events, engine = make(tmp_path)
    key = StageKey.step("judge", 0)

    def boom(_):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        engine.run(key, {"judge": "x"}, [], boom)
    assert store.stage_record(key).status == "failed"
    ran = []
    engine.run(key, {"judge": "x"}, [], lambda d: ran.append(1) or Outcome())
    assert ran == [1] and store.stage_record(key).status == "done"


def test_a_stage_whose_upstream_has_not_run_is_refused_in_one_line(tmp_path):
    store, events, engine = make(tmp_path)
    with pytest.raises(UserError) as e:
        engine.upstream(StageKey.step("infer", 2))
    assert "r02/train has not run yet" in str(e.value)


def test_the_spend_so_far_is_recorded_with_each_stage(tmp_path):
    store = RunStore(tmp_path)
    store.init_manifest(seed=1)
    ledger = {"total": {"calls": 2, "usd": 0.5}, "by_stage": {}}
    engine = Engine(store, lambda e: None, ledger=lambda: ledger)
    engine.run(StageKey.step("judge", 0), {}, [], lambda d: Outcome())
    assert store.read_manifest().ledger.total.usd == 0.5
