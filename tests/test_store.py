import contextlib
import os
import subprocess
import sys

import pytest

from llamaduo.artifacts import Completion, Manifest, MetricStats, RoundRecord, Scores, StageKey
from llamaduo.errors import UserError
from llamaduo.files import atomic_write_text, read_json, read_jsonl, write_json, write_jsonl
from llamaduo.hashing import hash_obj
from llamaduo.store import RunStore


def test_layout_names_are_fixed_and_zero_padded(tmp_path):
    s = RunStore(tmp_path / "run")
    assert s.adapter_dir(3).relative_to(s.root).as_posix() == "rounds/r03/adapter"
    assert s.predictions_path(0).name == "predictions.jsonl"
    assert s.train_path.relative_to(s.root).as_posix() == "data/train.jsonl"
    assert s.service_db.name == "service.sqlite"


def test_manifest_is_written_and_read_back_as_its_type(tmp_path):
    s = RunStore(tmp_path)
    s.init_manifest(seed=7)
    s.mark_stage("r00/train", "done", inputs_hash="abc", components={"train": "h1"}, examples=12)
    s.set_round(RoundRecord(round=0, value=41.5, passed=False, train_examples=12))
    m = s.read_manifest()
    assert isinstance(m, Manifest)
    assert m.seed == 7 and "python" in m.versions
    assert m.stage(StageKey.step("train", 0)).inputs_hash == "abc"
    assert m.stage("r00/train").examples == 12
    assert m.rounds["r00"].value == 41.5


def test_a_manifest_written_by_the_previous_version_loads(tmp_path):
    """The previous layout wrote the same keys as plain JSON; it reads as the typed manifest."""
    old = {
        "version": 1, "created_at": "2026-11-30T10:00:00Z", "seed": 3, "versions": {"python": "3.11.7"},
        "stages": {
            "prepare": {"status": "done", "at": "t", "inputs_hash": "p", "train": 54, "test": 18},
            "r00/infer": {"status": "done", "at": "t", "inputs_hash": "i", "components": {"infer": "x"},
                          "predictions": 36, "seconds": 1.5, "new_tokens": 400},
        },
        "rounds": {"r00": {"round": 0, "value": 12.0, "passed": False, "train_examples": 54, "synthetic_added": 0,
                           "decision": {"passed": False, "value": 12.0, "target": 90.0, "statistic": "mean",
                                        "metric": "precision", "reason": "mean precision 12.00 < 90"}}},
        "ledger": {"total": {"calls": 3, "cached": 0, "failed": 0, "input_tokens": 10, "output_tokens": 5,
                             "usd": 0.01, "saved_usd": 0.0}, "by_stage": {}, "unpriced_models": []},
        "state": "finished", "stop_reason": "max_rounds", "best_round": 0, "best_value": 12.0,
    }
    write_json(tmp_path / "manifest.json", old)
    m = RunStore(tmp_path).read_manifest()
    assert m.stage("r00/infer").new_tokens == 400 and m.ledger.total.calls == 3
    assert m.rounds["r00"].decision.target == 90.0


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"version": 1, "stages": {', "Invalid JSON"),
        ("[1, 2]", "Input should be an object"),
        ('{"version": 1, "stagez": {}}', "field 'stagez'"),
        ('{"version": 9}', "manifest version 9"),
    ],
)
def test_a_damaged_manifest_is_one_line_naming_the_file_and_what_to_do(tmp_path, content, says):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(UserError) as e:
        RunStore(tmp_path).read_manifest()
    msg = str(e.value)
    assert "\n" not in msg and "manifest.json" in msg and says in msg
    assert "--fresh" in msg


def test_scores_read_back_as_scores_with_one_spelling_per_key(tmp_path):
    s = RunStore(tmp_path)
    scores = Scores(precision=MetricStats(n=2, mean=50.0, median=50.0, coverage_50=100.0, coverage_70=0.0, ci=[40.0, 60.0]))
    s.write_scores(1, scores)
    on_disk = read_json(s.scores_path(1))
    assert on_disk["precision"]["coverage@50"] == 100.0 and on_disk["precision"]["ci"] == [40.0, 60.0]
    back = s.read_scores(1)
    assert back == scores and back.stat("precision", "coverage@50") == 100.0
    assert back.similarity.mean is None  # not measured stays None, never 0


def test_a_bad_row_is_named_by_file_and_line_with_the_stage_to_rerun(tmp_path):
    s = RunStore(tmp_path)
    s.write_predictions(0, [Completion(prompt_id="a", sample_index=0, text="x")])
    with open(s.predictions_path(0), "a") as fh:
        fh.write('{"prompt_id": "b"}\n')
    with pytest.raises(UserError) as e:
        s.read_predictions(0)
    assert "predictions.jsonl:2: field 'sample_index'" in str(e.value)
    assert "llamaduo infer" in str(e.value) and "--round 0" in str(e.value)


def test_atomic_write_leaves_old_file_intact_when_the_writer_is_killed(tmp_path):
    target = tmp_path / "data.jsonl"
    write_jsonl(target, [{"a": 1}])
    # A child process starts writing a large file and is killed mid-write.
    code = (
        "import os, sys\n"
        "from llamaduo.files import atomic_write_bytes\n"
        "class Slow(bytes): pass\n"
        "import llamaduo.files as st\n"
        "orig = os.replace\n"
        "def never(*a): os.kill(os.getpid(), 9)\n"
        "os.replace = never\n"
        f"atomic_write_bytes(st.Path({str(target)!r}), b'x' * 10_000_000)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode != 0
    assert read_jsonl(target) == [{"a": 1}]


def test_atomic_write_cleans_its_temp_file_on_error(tmp_path):
    class Boom(Exception):
        pass

    target = tmp_path / "x.txt"
    atomic_write_text(target, "old")
    try:
        os_replace = os.replace

        def fail(*a):
            raise Boom

        os.replace = fail
        with contextlib.suppress(Boom):
            atomic_write_text(target, "new")
    finally:
        os.replace = os_replace
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_hash_obj_is_order_insensitive_for_dict_keys():
    assert hash_obj({"a": 1, "b": 2}) == hash_obj({"b": 2, "a": 1})
    assert hash_obj({"a": 1}) != hash_obj({"a": 2})
