import contextlib
import os
import subprocess
import sys

from llamaduo.store import RunStore, atomic_write_text, hash_obj, read_jsonl, write_jsonl


def test_layout_names_are_fixed_and_zero_padded(tmp_path):
    s = RunStore(tmp_path / "run")
    assert s.adapter_dir(3).relative_to(s.root).as_posix() == "rounds/r03/adapter"
    assert s.predictions_path(0).name == "predictions.jsonl"
    assert s.train_path.relative_to(s.root).as_posix() == "data/train.jsonl"
    assert s.service_db.name == "service.sqlite"


def test_stage_done_requires_matching_inputs_hash(tmp_path):
    s = RunStore(tmp_path)
    s.init_manifest(seed=7)
    s.mark_stage("r00/train", "done", inputs_hash="abc")
    assert s.stage_done("r00/train", "abc")
    assert not s.stage_done("r00/train", "xyz")
    s.mark_stage("r00/train", "running", inputs_hash="abc")
    assert not s.stage_done("r00/train", "abc")
    m = s.load_manifest()
    assert m["seed"] == 7 and "python" in m["versions"]


def test_atomic_write_leaves_old_file_intact_when_the_writer_is_killed(tmp_path):
    target = tmp_path / "data.jsonl"
    write_jsonl(target, [{"a": 1}])
    # A child process starts writing a large file and is killed mid-write.
    code = (
        "import os, sys\n"
        "from llamaduo.store import atomic_write_bytes\n"
        "class Slow(bytes): pass\n"
        "import llamaduo.store as st\n"
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
