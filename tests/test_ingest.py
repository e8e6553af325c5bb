"""Reading files record by record: positions as messages name them, and unreadable inputs."""

import json
from pathlib import Path

import pytest

from llamaduo.ingest import DataError, read_records

FIXTURES = Path(__file__).parent / "fixtures"


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    a, b = json.dumps({"prompt": "a", "response": "b"}), json.dumps({"prompt": "c", "response": "d"})
    path = tmp_path / "gaps.jsonl"
    path.write_text(f"\n{a}\n\n  \n{b}\n")
    assert [r.line for r in read_records(path)] == [2, 5]


def test_csv_row_number_is_the_data_row_even_after_a_multiline_cell():
    recs = list(read_records(FIXTURES / "custom_fields.csv"))
    assert [r.line for r in recs] == [1, 2, 3, 4]
    assert recs[3].data["instruction"] == "Multiply 4 by 6,\nthen add 1."
    assert all(r.unit == "row" for r in recs)


def test_unknown_extension_and_missing_file_are_one_clear_problem(tmp_path):
    (tmp_path / "c.txt").write_text("hello")
    with pytest.raises(DataError) as e:
        list(read_records(tmp_path / "c.txt"))
    assert "unknown format '.txt'" in str(e.value.problems[0])
    with pytest.raises(DataError) as e:
        list(read_records(tmp_path / "absent.jsonl"))
    assert "no such file" in str(e.value.problems[0])
