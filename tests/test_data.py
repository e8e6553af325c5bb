"""Coverage ingestion: readers, field mapping and validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from llamaduo.config import DataConfig, FieldMap
from llamaduo.coverage import DataError, Problem, load_coverage
from llamaduo.data import content_id

FIXTURES = Path(__file__).parent / "fixtures"

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
    expected_ids = [r["id"] for r in RECORDS]  # the user's own ids are kept
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
        "chat.jsonl:3: field 'messages[0].role': must be system, user, assistant or tool, got 'human'",
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
        "coverage.jsonl:3: field 'response': missing (the record's fields: id, prompt; map yours with data.fields.response)",
        "coverage.jsonl:4: field 'prompt': empty",
        "coverage.jsonl:5: field 'prompt': must be a string, got int",
        "coverage.jsonl:5: field 'response': must be a string, got list",
        "coverage.jsonl:6: undecodable bytes (not UTF-8) at column 27",
        "coverage.jsonl:7: field 'id': duplicate id 'a' (first at coverage.jsonl:1)",
    ]
    assert str(e.value) == "coverage.jsonl: 7 problems in 8 records"


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


# ------------------------------------------------------------- what the user gave
def test_user_ids_are_kept_and_a_content_hash_names_only_records_without_one(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 7, "prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}])
    ex = load_coverage(path, DataConfig()).examples
    assert ex[0].id == "7" and ex[1].id == content_id(ex[1].messages)


def test_null_content_is_reported_as_null_not_missing(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": None, "response": "b"},
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
    ])
    with pytest.raises(DataError) as e:
        load_coverage(path, DataConfig())
    assert [str(p) for p in e.value.problems] == [
        "c.jsonl:1: field 'prompt': is null",
        "c.jsonl:2: field 'messages[0].content': must be a string, got null",
    ]


def test_hostile_json_is_a_problem_with_its_line_not_a_crash(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "c.jsonl"
    path.write_text(deep + "\n" + json.dumps({"prompt": "caf\ud800", "response": "b"}) + "\n")
    with pytest.raises(DataError) as e:
        load_coverage(path, DataConfig())
    got = [str(p) for p in e.value.problems]
    assert got[0] == "c.jsonl:1: bad JSON: nested too deeply to be a record"
    assert got[1].startswith("c.jsonl:2: field 'prompt': holds a lone surrogate (\\ud800)")
    as_array = tmp_path / "c.json"
    as_array.write_text(deep)
    with pytest.raises(DataError, match="problem"):
        load_coverage(as_array, DataConfig())


def test_a_directory_read_as_jsonl_is_one_problem(tmp_path):
    with pytest.raises(DataError) as e:
        load_coverage(tmp_path, DataConfig(format="jsonl"))
    assert "is a directory; data.format=jsonl reads a file" in str(e.value.problems[0])
