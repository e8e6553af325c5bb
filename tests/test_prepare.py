"""`prepare`: the stratified split, the stats and what a prepared run directory holds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from llamaduo import loop
from llamaduo.config import Config, from_dict
from llamaduo.data import Example, load_examples, make_example
from llamaduo.files import read_json
from llamaduo.ingest import DataError
from llamaduo.prepare import compute_stats, prepare, render_stats_table, split
from llamaduo.store import RunStore
from tests.test_data import RECORDS, broken_file, write_jsonl

EXAMPLES = Path(__file__).parents[1] / "examples"
SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"


def config(tmp_path: Path, **data) -> Config:
    return from_dict({"data": data, "runs_dir": str(tmp_path / "runs"), "name": "run"})


def categories(n_per_cat: dict[str, int]) -> list[Example]:
    return [
        make_example(f"{cat} prompt {i}", f"{cat} answer {i}", cat)
        for cat, n in n_per_cat.items()
        for i in range(n)
    ]


# ------------------------------------------------------------------ invalid input
def test_prepare_with_bad_input_raises_and_leaves_no_run_dir(tmp_path):
    cfg = config(tmp_path, input=str(broken_file(tmp_path)))
    store = RunStore(cfg.run_dir)
    with pytest.raises(DataError) as e:
        prepare(cfg, store)
    assert len(e.value.problems) == 7
    assert not store.root.exists() and not (tmp_path / "runs").exists()


def test_bad_input_never_touches_an_existing_prepared_run(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", RECORDS)
    cfg = config(tmp_path, input=str(good), test_fraction=0.5)
    store = RunStore(cfg.run_dir)
    prepare(cfg, store)
    before = {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()}
    with pytest.raises(DataError):
        prepare(config(tmp_path, input=str(broken_file(tmp_path))), store)
    assert {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()} == before


# -------------------------------------------------------------------------- split
def test_stratified_split_covers_every_category_and_adds_up():
    exs = categories({"a": 50, "b": 20, "c": 3, "d": 2, "solo": 1})
    train, test = split(exs, 0.1, seed=7)
    assert len(train) + len(test) == len(exs)
    assert not {e.id for e in train} & {e.id for e in test}
    # Proportional, at least one each; the singleton stays in train.
    assert Counter(e.category for e in test) == {"a": 5, "b": 2, "c": 1, "d": 1}
    assert all(Counter(e.category for e in train)[c] >= 1 for c in "abcd")


def test_split_is_deterministic_per_seed_and_differs_across_seeds():
    exs = categories({"a": 40, "b": 30})
    first = split(exs, 0.25, seed=1)
    # Input order does not change which examples are held out.
    assert split(list(reversed(exs)), 0.25, seed=1)[1] == list(reversed(first[1]))
    assert [e.id for e in split(exs, 0.25, seed=1)[1]] == [e.id for e in first[1]]
    assert {e.id for e in split(exs, 0.25, seed=2)[1]} != {e.id for e in first[1]}


def test_a_new_category_does_not_reshuffle_the_others():
    base = categories({"a": 30, "b": 30})
    grown = base + categories({"c": 30})
    test_ab = {e.id for e in split(base, 0.2, seed=3)[1]}
    assert test_ab <= {e.id for e in split(grown, 0.2, seed=3)[1]}


def test_max_test_is_a_hard_cap():
    exs = categories({"a": 100, "b": 50, "c": 10})
    assert len(split(exs, 0.5, seed=0, max_test=12)[1]) == 12
    assert Counter(e.category for e in split(exs, 0.5, seed=0, max_test=2)[1]) == {"a": 1, "b": 1}


def test_no_robots_split_adds_up_per_category(tmp_path):
    src = SHARED_DATA / "no_robots" / "no_robots.jsonl"
    if not src.exists():
        pytest.skip("shared data not present")
    result = prepare(config(tmp_path, input=str(src)), RunStore(tmp_path / "runs" / "run"))
    cats = result.stats["categories"]
    assert {c: v["total"] for c, v in cats.items()} == {
        "Summarize": 395, "Classify": 334, "Closed QA": 245, "Coding": 334,
        "Extract": 183, "Open QA": 1182, "Brainstorm": 1060, "Rewrite": 625,
    }  # fmt: skip
    assert all(v["test"] >= 1 for v in cats.values())
    assert result.train_count + result.test_count == 4358


# -------------------------------------------------------------------------- stats
class WordTokenizer:
    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]


def test_stats_count_categories_per_split_and_give_length_quantiles():
    train = [make_example("x" * n, "y" * (2 * n), "a" if n <= 6 else "b") for n in range(1, 9)]
    test = [make_example("x" * n, "y" * (2 * n), "b") for n in (9, 10)]
    stats = compute_stats(train, test)
    assert stats["counts"] == {"train": 8, "test": 2, "total": 10}
    assert stats["categories"] == {
        "a": {"train": 6, "test": 0, "total": 6},
        "b": {"train": 2, "test": 2, "total": 4},
    }
    assert stats["chars"]["prompt"] == {"p10": 1, "p50": 5, "p90": 9, "max": 10}  # nearest rank over 1..10
    assert stats["chars"]["response"] == {"p10": 2, "p50": 10, "p90": 18, "max": 20}
    assert "tokens" not in stats


def test_token_stats_accept_an_encoder_or_a_callable_tokenizer():
    exs = [make_example("one two three", "a b", "c"), make_example("one", "a b c d", "c")]
    by_encode = compute_stats(exs, [], WordTokenizer())["tokens"]
    by_call = compute_stats(exs, [], lambda text: {"input_ids": text.split()})["tokens"]
    assert by_encode == by_call
    assert by_encode["prompt"]["max"] == 3 and by_encode["response"]["p10"] == 2


def test_stats_table_lists_each_category_and_the_lengths():
    from rich.console import Console
    from rich.table import Table

    table = render_stats_table(compute_stats(*split(categories({"alpha": 6, "beta": 4}), 0.5, seed=0)))
    assert isinstance(table, Table)
    console = Console(width=100, record=True)
    console.print(table)
    text = console.export_text()
    assert "alpha" in text and "beta" in text and "prompt chars: p10" in text
    assert [c.header for c in table.columns] == ["category", "train", "test", "total"]


# ------------------------------------------------------------------------ prepare
def test_prepare_writes_the_split_stats_config_and_manifest(tmp_path):
    cfg = config(tmp_path, input=str(EXAMPLES / "coverage_small.jsonl"), test_fraction=0.2)
    store = RunStore(cfg.run_dir)
    result = loop.prepare(cfg)
    train, test = load_examples(store.train_path), load_examples(store.test_path)
    assert (len(train), len(test)) == (result.train_count, result.test_count) == (32, 8)
    assert Counter(e.category for e in test) == {"rewrite": 2, "extract": 2, "classify": 2, "closed_qa": 2}
    assert read_json(store.stats_path) == result.stats
    assert result.stats["input"] == {
        "records": 40,
        "duplicates": 0,
        "filtered_out": 0,
        "removed_as_in_test_file": 0,
    }
    assert "test_fraction: 0.2" in store.config_path.read_text()
    stage = store.stage_record("prepare")
    assert stage.status == "done" and stage.train == 32
    assert store.read_manifest().seed == cfg.seed
    assert train[0].lineage.origin.startswith("coverage_small.jsonl:")


def test_ids_and_files_are_stable_across_runs(tmp_path):
    src = str(EXAMPLES / "coverage_small.jsonl")
    ca = config(tmp_path, input=src).model_copy(update={"name": "a"})
    cb = config(tmp_path, input=src).model_copy(update={"name": "b"})
    loop.prepare(ca)
    loop.prepare(cb)
    a, b = RunStore(ca.run_dir), RunStore(cb.run_dir)
    assert a.train_path.read_bytes() == b.train_path.read_bytes()
    assert a.test_path.read_bytes() == b.test_path.read_bytes()
    first = load_examples(a.train_path)[0]
    assert first.id.startswith("small-")  # the user's own id, kept
    assert a.stage_record("prepare").inputs_hash == b.stage_record("prepare").inputs_hash


def test_inputs_hash_follows_the_input_content_and_the_seed(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", RECORDS)

    def prepared_hash(name: str, seed: int = 0) -> str:
        cfg = from_dict({"data": {"input": str(src), "test_fraction": 0.5}, "seed": seed,
                         "runs_dir": str(tmp_path), "name": name})
        loop.prepare(cfg)  # recorded by the stage engine, as `llamaduo run` records it
        return RunStore(cfg.run_dir).stage_record("prepare").inputs_hash

    h0 = prepared_hash("r0")
    assert prepared_hash("r1", seed=1) != h0
    write_jsonl(src, RECORDS[:2] + [RECORDS[2] | {"response": "No."}])
    assert prepared_hash("r2") != h0


def test_test_file_mode_removes_its_examples_from_train(tmp_path):
    train_src = write_jsonl(tmp_path / "train.jsonl", RECORDS + [{"prompt": "Extra?", "response": "Yes."}])
    test_src = write_jsonl(tmp_path / "test.jsonl", [RECORDS[0], {"prompt": "New?", "response": "Indeed."}])
    cfg = config(tmp_path, input=str(train_src), test_file=str(test_src))
    result = prepare(cfg, RunStore(cfg.run_dir))
    train = load_examples(RunStore(cfg.run_dir).train_path)
    test = load_examples(RunStore(cfg.run_dir).test_path)
    assert {e.prompt for e in test} == {"Name a fruit.", "New?"}
    assert "Name a fruit." not in {e.prompt for e in train} and len(train) == 3
    assert result.warnings == [
        "1 training example(s) also in the test file were removed from train",
        "no test examples for category ['qa']",
    ]
    assert result.stats["input"]["removed_as_in_test_file"] == 1


def test_too_few_examples_to_split_is_an_error_and_writes_nothing(tmp_path):
    src = write_jsonl(tmp_path / "one.jsonl", RECORDS[:1])
    cfg = config(tmp_path, input=str(src))
    with pytest.raises(DataError, match="1 problem in 1 records"):
        prepare(cfg, RunStore(cfg.run_dir))
    assert not cfg.run_dir.exists()


def test_a_split_that_cannot_honour_test_fraction_says_by_how_much():
    from llamaduo.prepare import split_warning

    [w] = split_warning(200, 52, 0.1, None)  # self-instruct: 71 small categories, one test example each
    assert w.startswith("test split is 20.6% of the data (52 of 252), not the 10.0% asked") and "+10.6%" in w
    assert split_warning(90, 10, 0.1, None) == []
