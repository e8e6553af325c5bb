"""JSON out of LLM replies and the strict-schema form of a model."""

from pydantic import BaseModel

from llamaduo.service import extract_json
from llamaduo.service.parsing import parse_reply


def test_fenced_and_prose_wrapped_json_is_parsed():
    assert extract_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('Sure! {"a": {"b": 2}} hope it helps') == {"a": {"b": 2}}


def test_a_reply_that_does_not_fit_the_schema_is_a_reason_not_an_exception():
    class Score(BaseModel):
        score: int

    assert parse_reply('{"score": 3}', Score) == (Score(score=3), None)
    parsed, reason = parse_reply('{"score": "high"}', Score)
    assert parsed is None and reason.startswith("invalid JSON for Score")
    assert parse_reply("no json here", Score)[1] == "invalid JSON for Score: no JSON object in the reply"
