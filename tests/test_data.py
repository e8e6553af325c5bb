"""Coverage ingestion: readers, field mapping, validation, split, stats and `prepare`."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from llamaduo.config import Config, DataConfig, FieldMap, from_dict
from llamaduo.data import (
    DataError,
    Example,
    Problem,
    compute_stats,
    content_id,
    load_coverage,
    load_examples,
    make_example,
    prepare,
    render_stats_table,
    split,
)
from llamaduo.store import RunStore, read_json

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLES = Path(__file__).parents[1] / "examples"
SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"

RECORDS = [
    {"id": "r1", "prompt": "Name a fruit.", "response": "Apple.", "category": "list"},
    {"id": "r2", "prompt": "Name a planet.", "response": "Mars.", "category": "list"},
    {"id": "r3", "prompt": "Is ice cold?", "response": "Yes.", "category": "qa"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def config(tmp_path: Path, **data) -> Config:
    return from_dict({"data": data, "runs_dir": str(tmp_path / "runs"), "name": "run"})


def categories(n_per_cat: dict[str, int]) -> list[Example]:
    return [
        make_example(f"{cat} prompt {i}", f"{cat} answer {i}", cat)
        for cat, n in n_per_cat.items()
        for i in range(n)
    ]


# ------------------------------------------------------------------------ formats
def write_all_formats(tmp_path: Path) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": write_jsonl(tmp_path / "c.jsonl", RECORDS)}
    paths["json"] = tmp_path / "c.json"
    paths["json"].write_text(json.dumps(RECORDS, indent=2))
    paths["csv"] = tmp_path / "c.csv"
    with open(paths["csv"], "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(RECORDS[0]))
        w.writeheader()
        w.writerows(RECORDS)
    paths["parquet"] = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), paths["parquet"])
    paths["hf"] = tmp_path / "c_hf"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(paths["hf"]))
    return paths


def test_every_format_yields_the_same_examples_with_its_own_kind_of_location(tmp_path):
    paths = write_all_formats(tmp_path)
    expected_ids = [make_example(r["prompt"], r["response"], r["category"]).id for r in RECORDS]
    origins = {}
    for fmt, path in paths.items():
        cov = load_coverage(path, DataConfig())
        assert [e.id for e in cov.examples] == expected_ids, fmt
        assert [e.category for e in cov.examples] == ["list", "list", "qa"]
        origins[fmt] = cov.examples[2].lineage.origin
    # JSONL counts lines, CSV counts data rows from 1, the indexed formats count from 0.
    assert origins == {
        "jsonl": "c.jsonl:3",
        "json": "c.json[2]",
        "csv": "c.csv:row 3",
        "parquet": "c.parquet[2]",
        "hf": "c_hf[2]",
    }


def test_hf_dataset_dict_reads_its_train_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"test": datasets.Dataset.from_list(RECORDS[:1]), "train": datasets.Dataset.from_list(RECORDS)}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_coverage(tmp_path / "dd", DataConfig()).examples) == 3


def test_explicit_format_overrides_the_extension(tmp_path):
    path = write_jsonl(tmp_path / "coverage.txt", RECORDS)
    assert len(load_coverage(path, DataConfig(format="jsonl")).examples) == 3


# ------------------------------------------------------------------ field mapping
def test_messages_keep_system_turns_and_target_the_last_assistant_turn():
    exs = load_coverage(FIXTURES / "chat.jsonl", DataConfig()).examples
    first, multi, parts = exs
    assert [m.role for m in first.messages] == ["system", "user", "assistant"]
    assert first.messages[0].content == "You answer in one word."
    assert (first.prompt, first.response) == ("Capital of Norway?", "Oslo")
    assert multi.response == "Amber."
    assert multi.prompt == "Another one, warmer this time."
    assert [m.content for m in multi.prompt_messages] == [
        "Give me a colour.",
        "Teal.",
        "Another one, warmer this time.",
    ]
    assert parts.prompt == "Spell cat backwards."  # text content parts are joined
    assert first.lineage.source == "coverage" and first.lineage.origin == "chat.jsonl:1"


def test_turns_after_the_last_assistant_turn_and_bad_roles_are_errors(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "and?"},
                ]
            },
            {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": 3}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
        ],
    )
    with pytest.raises(DataError) as e:
        load_coverage(path, DataConfig())
    lines = [str(p) for p in e.value.problems]
    assert lines == [
        "chat.jsonl:2: field 'messages[2]': 1 turn(s) after the last assistant turn have no target",
        "chat.jsonl:3: field 'messages[0].role': must be system, user or assistant, got 'human'",
        "chat.jsonl:3: field 'messages[1].content': must be a string, got int",
        "chat.jsonl:4: field 'messages': has no assistant turn to learn from",
    ]


def test_custom_field_names_map_prompt_response_category_and_system():
    cfg = DataConfig(
        fields=FieldMap(id="uid", prompt="instruction", response="output", category="task", system="preamble")
    )
    exs = load_coverage(FIXTURES / "custom_fields.csv", cfg).examples
    assert [e.category for e in exs] == ["translate", "math", "translate", "math"]
    assert exs[0].prompt == 'Translate "good night" to French.' and exs[0].response == "Bonne nuit."
    assert [m.role for m in exs[1].messages] == ["system", "user", "assistant"]
    assert exs[1].messages[0].content == "Answer with a number only."
    assert [m.role for m in exs[0].messages] == ["user", "assistant"]  # an empty system cell adds no turn


def test_records_without_category_get_the_default(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "response": "b"}])
    assert load_coverage(path, DataConfig(default_category="misc")).examples[0].category == "misc"


# --------------------------------------------------------------------- validation
def broken_file(tmp_path: Path) -> Path:
    path = tmp_path / "coverage.jsonl"
    lines = [
        json.dumps({"id": "a", "prompt": "fine", "response": "ok"}).encode(),
        b'{"id": "b", "prompt": "broken",',
        json.dumps({"id": "c", "prompt": "no answer"}).encode(),
        json.dumps({"id": "d", "prompt": "  ", "response": "empty prompt"}).encode(),
        json.dumps({"id": "e", "prompt": 42, "response": ["a", "list"]}).encode(),
        b'{"id": "f", "prompt": "caf\xe9", "response": "latin-1 bytes"}',
        json.dumps({"id": "a", "prompt": "another", "response": "same id"}).encode(),
        json.dumps({"id": "g", "prompt": "fine too", "response": "ok"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_problem_is_listed_with_its_line_and_field(tmp_path):
    with pytest.raises(DataError) as e:
        load_coverage(broken_file(tmp_path), DataConfig())
    assert [str(p) for p in e.value.problems] == [
        "coverage.jsonl:2: bad JSON: Expecting property name enclosed in double quotes (column 32)",
        "coverage.jsonl:3: field 'response': missing",
        "coverage.jsonl:4: field 'prompt': empty",
        "coverage.jsonl:5: field 'prompt': must be a string, got int",
        "coverage.jsonl:5: field 'response': must be a string, got list",
        "coverage.jsonl:6: undecodable bytes (not UTF-8) at column 27",
        "coverage.jsonl:7: field 'id': duplicate id 'a' (first at coverage.jsonl:1)",
    ]
    assert str(e.value) == "coverage.jsonl: 7 problems in 8 records"


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


def test_invalid_utf8_in_csv_and_json_names_each_bad_line(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b"prompt,response\nfine,ok\ncaf\xe9,x\nfine,ok\nna\xefve,y\n")
    with pytest.raises(DataError) as e:
        load_coverage(path, DataConfig())
    assert [p.line for p in e.value.problems] == [3, 5]
    path = tmp_path / "c.json"
    path.write_bytes(b'[\n{"prompt": "a", "response": "b"},\n{"prompt": "\xff", "response": "b"}\n]')
    with pytest.raises(DataError) as e:
        load_coverage(path, DataConfig())
    assert str(e.value.problems[0]).startswith("c.json:3: undecodable bytes")


def test_csv_problems_say_row_and_json_problems_give_the_index(tmp_path):
    (tmp_path / "c.csv").write_text("prompt,response\nfine,ok\nno answer,\n")
    with pytest.raises(DataError) as e:
        load_coverage(tmp_path / "c.csv", DataConfig())
    assert str(e.value.problems[0]) == "c.csv:row 2: field 'response': empty"
    (tmp_path / "c.json").write_text(json.dumps([{"prompt": "a", "response": "b"}, "just a string"]))
    with pytest.raises(DataError) as e:
        load_coverage(tmp_path / "c.json", DataConfig())
    assert str(e.value.problems[0]) == "c.json[1]: expected an object, got str"


def test_duplicate_content_is_kept_once_and_counted_as_a_warning(tmp_path):
    rows = [
        {"prompt": "p", "response": "r"},
        {"prompt": "q", "response": "s"},
        {"prompt": "p", "response": "r"},
    ]
    cov = load_coverage(write_jsonl(tmp_path / "c.jsonl", rows), DataConfig())
    assert len(cov.examples) == 2 and cov.duplicates == 1
    assert cov.warnings == ["c.jsonl: 1 exact duplicate record(s) kept once"]


def test_same_prompt_with_different_responses_is_not_a_duplicate(tmp_path):
    rows = [{"prompt": "p", "response": "one"}, {"prompt": "p", "response": "two"}]
    cov = load_coverage(write_jsonl(tmp_path / "c.jsonl", rows), DataConfig())
    assert len(cov.examples) == 2 and cov.duplicates == 0


def test_category_filter_keeps_only_the_named_categories(tmp_path):
    cov = load_coverage(write_jsonl(tmp_path / "c.jsonl", RECORDS), DataConfig(categories=["qa", "nope"]))
    assert [e.category for e in cov.examples] == ["qa"] and cov.filtered_out == 2
    assert cov.warnings == ["c.jsonl: no records in category ['nope']"]


def test_problem_without_a_line_names_only_the_file():
    assert str(Problem(source="c.jsonl", message="no records")) == "c.jsonl: no records"


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
    result = prepare(cfg, store)
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
    assert stage["status"] == "done" and stage["train"] == 32
    assert store.load_manifest()["seed"] == cfg.seed
    assert train[0].lineage.origin.startswith("coverage_small.jsonl:")


def test_ids_and_files_are_stable_across_runs(tmp_path):
    src = str(EXAMPLES / "coverage_small.jsonl")
    a, b = RunStore(tmp_path / "a"), RunStore(tmp_path / "b")
    prepare(config(tmp_path, input=src), a)
    prepare(config(tmp_path, input=src), b)
    assert a.train_path.read_bytes() == b.train_path.read_bytes()
    assert a.test_path.read_bytes() == b.test_path.read_bytes()
    first = load_examples(a.train_path)[0]
    assert first.id == content_id(first.messages)
    assert a.stage_record("prepare")["inputs_hash"] == b.stage_record("prepare")["inputs_hash"]


def test_inputs_hash_follows_the_input_content_and_the_seed(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", RECORDS)

    def prepared_hash(name: str, seed: int = 0) -> str:
        store = RunStore(tmp_path / name)
        prepare(from_dict({"data": {"input": str(src), "test_fraction": 0.5}, "seed": seed}), store)
        return store.stage_record("prepare")["inputs_hash"]

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
