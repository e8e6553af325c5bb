"""The tool-call streamer: whatever pieces an answer's text arrives in, its deltas add up to what the
whole answer is read as (content and calls), calls open before their arguments are complete."""

from __future__ import annotations

import random

import pytest

from llamaduo.tool_stream import ToolCallStream
from llamaduo.tools import parse_tool_calls

NAMES = {"route", "refund"}
ANSWERS = [
    'Sure.\n<tool_call>\n{"name": "route", "arguments": {"team": "bil}\\\\\\"ling", "tags": [1, {"a": 2}]}}\n</tool_call>\n'
    '<tool_call>\n{"name": "refund", "arguments": {}}\n</tool_call>',
    "plain text with <tool_ca in it",
    '<tool_call>{"arguments": {"x": 1}, "name": "route"}</tool_call> and after',
    '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
    '{"name": "route", "parameters": {"team": "sales"}}',
    '{"item": "mug", "quantity": 3}',
    '  <tool_call>\n{"name":"refund","arguments":{"order":"A-1"}}\n</tool_call>  ',
]


def replay(text: str, parallel: bool, rng: random.Random) -> tuple[str | None, list[tuple[str, str]], str, list]:
    s = ToolCallStream(NAMES, parallel)
    out, i = [], 0
    while i < len(text):
        k = rng.randint(1, 5)
        out += s.feed(text[i:i + k])
        i += k
    more, reason = s.finish("stop")
    out += more
    calls: dict[int, list[str]] = {}
    for d in out:
        for c in d.get("tool_calls", []):
            entry = calls.setdefault(c["index"], ["", ""])
            entry[0] = c["function"].get("name") or entry[0]
            entry[1] += c["function"].get("arguments") or ""
    content = "".join(d.get("content", "") for d in out) or None
    return content, [tuple(v) for _, v in sorted(calls.items())], reason, out


@pytest.mark.parametrize("text", ANSWERS)
@pytest.mark.parametrize("parallel", [True, False])
def test_streamed_deltas_add_up_to_the_whole_answers_content_and_calls(text, parallel):
    rng = random.Random(7)
    rest, calls = parse_tool_calls(text, NAMES)
    calls = calls if parallel else calls[:1]
    want = (rest, [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    for _ in range(25):
        content, got, reason, _ = replay(text, parallel, rng)
        assert (content, got) == want
        assert reason == ("tool_calls" if calls else "stop")


def test_a_call_opens_with_its_id_and_name_before_its_arguments_are_decoded():
    s = ToolCallStream(NAMES)
    assert s.feed("<tool_call>\n") == []  # nothing to say yet
    head, fragment = s.feed('{"name": "route", "arguments": {"te')
    [opened] = head["tool_calls"]
    assert opened["id"].startswith("call_") and opened["function"] == {"name": "route", "arguments": ""}
    assert fragment == {"tool_calls": [{"index": 0, "function": {"arguments": '{"te'}}]}
    assert s.feed('am": "sales"}}\n</tool_call>') == [{"tool_calls": [{"index": 0, "function": {"arguments": 'am": "sales"}'}}]}]
    assert s.finish("stop") == ([], "tool_calls")


def test_a_call_cut_off_by_max_tokens_ends_with_length():
    s = ToolCallStream(NAMES)
    s.feed('<tool_call>\n{"name": "route", "arguments": {"team": "sa')
    assert s.finish("length") == ([], "length")
