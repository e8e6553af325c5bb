"""Structured tasks: tool-calling and JSON-schema coverage data, validated like a request to `serve`,
rendered for training exactly as `serve` renders the same request."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from llamaduo import structure
from llamaduo.config import DataConfig, InferConfig, ServeConfig
from llamaduo.coverage import load_coverage
from llamaduo.ingest import DataError
from llamaduo.tools import parse_tool_calls
from tests.tiny import tiny_model  # noqa: F401

ROUTE = {"type": "object", "properties": {"order_id": {"type": "string"}, "reason": {"enum": ["late", "damaged"]}},
         "required": ["order_id", "reason"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "refund", "description": "Refund an order", "parameters": ROUTE}},
    {"type": "function", "function": {"name": "track", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
]


def call(name: str, args: dict, cid: str = "call_1") -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def tool_record(user: str, name: str, args: dict, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": None, "tool_calls": [call(name, args)]}],
            "tools": TOOLS, **extra}


GOOD = [
    tool_record("Order 17 came broken, refund it", "refund", {"order_id": "17", "reason": "damaged"}),
    tool_record("Where is order 9?", "track", {"order_id": "9"}, tool_choice="required"),
    # a whole exchange: the call, the tool's answer, the assistant's reply as the target
    {"messages": [{"role": "user", "content": "Where is order 3?"},
                  {"role": "assistant", "content": "", "tool_calls": [call("track", {"order_id": "3"})]},
                  {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
                  {"role": "assistant", "content": "Order 3 has shipped."}], "tools": TOOLS},
]


def write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_tool_calling_coverage_loads_with_its_tools_calls_and_tool_turns(tmp_path):
    cov = load_coverage(write(tmp_path / "c.jsonl", GOOD), DataConfig(), check=structure.check)
    first, forced, exchange = cov.examples
    assert first.tools == TOOLS and first.messages[-1].tool_calls[0].function.name == "refund"
    assert first.response == '<tool_call>\n{"name": "refund", "arguments": {"order_id": "17", "reason": "damaged"}}\n</tool_call>'
    assert forced.tool_choice == "required" and structure.spec(forced).tools_required
    assert [m.role for m in exchange.messages] == ["user", "assistant", "tool", "assistant"]
    assert exchange.messages[2].tool_call_id == "call_1" and exchange.response == "Order 3 has shipped."


def test_every_malformed_structure_is_one_error_naming_its_line_and_field(tmp_path):
    bad = [
        tool_record("a", "cancel", {"order_id": "1"}),  # not an offered tool
        tool_record("b", "refund", {"order_id": 1, "reason": "damaged"}),  # argument of the wrong type
        tool_record("c", "refund", {"order_id": "1", "reason": "lost"}),  # not in the enum
        {**tool_record("d", "track", {"order_id": "1"}), "tools": [{"type": "function", "function": {
            "name": "track", "parameters": {"type": "objekt"}}}]},  # not JSON Schema
        {"prompt": "e", "response": "not json", "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": ROUTE}}},  # the reference is not an answer of the format
        {"messages": [{"role": "user", "content": "f"},
                      {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}],
         "tools": TOOLS},  # a call with no name
        {"messages": [{"role": "user", "content": "g"}, {"role": "tool", "content": "x"},
                      {"role": "assistant", "content": "ok"}], "tools": TOOLS},  # tool turn without its call id
        {**tool_record("h", "track", {"order_id": "1"}), "tool_choice": {"type": "function", "function": {"name": "refund"}}},
        {"prompt": "i", "response": "plain text", "tools": TOOLS, "tool_choice": "required"},  # no call where one is required
        {"prompt": "j", "response": "k", "parallel_tool_calls": "nope"},  # not a boolean
        {"prompt": "l", "response": "m", "tools": TOOLS, "tool_choice": 5},  # neither a name nor an object
    ]
    with pytest.raises(DataError) as err:
        load_coverage(write(tmp_path / "c.jsonl", [GOOD[0], *bad]), DataConfig(), check=structure.check)
    lines = "\n".join(err.value.details())
    expected = [
        ("c.jsonl:2", "messages[1].tool_calls[0].function.name", "'cancel' is not an offered tool"),
        ("c.jsonl:3", "messages[1].tool_calls[0].function.arguments", "is not of type 'string'"),
        ("c.jsonl:4", "messages[1].tool_calls[0].function.arguments", "'lost' is not one of"),
        ("c.jsonl:5", "tools[0].function.parameters", "not a valid JSON Schema"),
        ("c.jsonl:6", "messages[1].content", "not JSON"),
        ("c.jsonl:7", "messages[1].tool_calls[0]", "must be"),
        ("c.jsonl:8", "messages[1].tool_call_id", "needs the id"),
        ("c.jsonl:9", "messages[1].tool_calls", "names 'refund'"),
        ("c.jsonl:10", "messages[1].tool_calls", "asks for a call"),
        ("c.jsonl:11", "parallel_tool_calls", "must be true or false"),
        ("c.jsonl:12", "tool_choice", "must be a string or an object"),
    ]
    for where, field, message in expected:
        line = next((ln for ln in lines.splitlines() if where + ":" in ln or where + " " in ln), "")
        assert field in line and message in line, (where, lines)


def test_the_tasks_response_format_applies_to_records_without_one(tmp_path):
    fmt = {"type": "json_schema", "json_schema": {"name": "route", "schema": ROUTE, "strict": True}}
    recs = [{"prompt": "p1", "response": json.dumps({"order_id": "1", "reason": "late"})},
            {"prompt": "p2", "response": json.dumps({"order_id": "2"})}]
    with pytest.raises(DataError) as err:
        load_coverage(write(tmp_path / "c.jsonl", recs), DataConfig(response_format=fmt), check=structure.check)
    assert "'reason' is a required property" in err.value.details()[0] and "c.jsonl:2" in err.value.details()[0]
    ok = load_coverage(write(tmp_path / "c.jsonl", recs[:1]), DataConfig(response_format=fmt), check=structure.check)
    assert ok.examples[0].response_format == fmt and structure.spec(ok.examples[0]).schema is not None


def test_a_tool_conversation_is_the_same_token_sequence_in_training_and_in_serving(tmp_path, tiny_model):  # noqa: F811
    from llamaduo.chat_api import parse_chat_request
    from llamaduo.config import ModelConfig
    from llamaduo.infer import prompt_ids
    from llamaduo.models import load_tokenizer
    from llamaduo.request_flow import structure as fit_request
    from llamaduo.train import tokenize_example

    tok, _ = load_tokenizer(ModelConfig(base=str(tiny_model)))
    cov = load_coverage(write(tmp_path / "c.jsonl", GOOD), DataConfig(), check=structure.check)
    for ex in cov.examples:
        row = tokenize_example(tok, ex, max_length=4096)
        n_prompt = len(prompt_ids(tok, structure.prompt_for(tok, ex)))  # the rest is the target
        body = {"model": "m", "messages": [m.openai() for m in ex.prompt_messages], **ex.request_fields()}
        req = parse_chat_request(json.dumps(body).encode(), ServeConfig(), InferConfig())
        asyncio.run(fit_request(req, tok, None if req.grammar is None else _grammars(tok)))
        assert row["input_ids"][:n_prompt] == prompt_ids(tok, req.prompt or req.messages)
        # The target is what `serve` reads back as the same call (or the same text).
        target = tok.decode(row["input_ids"][n_prompt:], skip_special_tokens=True)
        names = {t["function"]["name"] for t in ex.tools}
        content, calls = parse_tool_calls(target, names)
        want = ex.messages[-1]
        if want.tool_calls:
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
                (c.function.name, json.loads(c.function.arguments)) for c in want.tool_calls]
        else:
            assert content == want.content and not calls


def _grammars(tok):
    from llamaduo.grammar import Grammars

    return Grammars(tok)


def test_answer_problem_says_why_a_generated_answer_does_not_fit(tmp_path):
    cov = load_coverage(write(tmp_path / "c.jsonl", GOOD[1:2]), DataConfig(), check=structure.check)
    ex = cov.examples[0]  # tool_choice required
    assert structure.answer_problem(ex, ex.response) is None
    assert "makes none" in structure.answer_problem(ex, "I will look it up")
    bad = '<tool_call>\n{"name": "refund", "arguments": {"order_id": "1", "reason": "lost"}}\n</tool_call>'
    assert "'lost' is not one of" in structure.answer_problem(ex, bad)


def test_a_tool_exchange_learns_every_assistant_turn_and_no_user_or_tool_text(tmp_path, tiny_model):  # noqa: F811
    from llamaduo.config import ModelConfig
    from llamaduo.models import load_tokenizer
    from llamaduo.train import tokenize_example

    tok, _ = load_tokenizer(ModelConfig(base=str(tiny_model)))
    exchange = load_coverage(write(tmp_path / "c.jsonl", GOOD[2:]), DataConfig(), check=structure.check).examples[0]
    row = tokenize_example(tok, exchange, max_length=4096)
    learnt = tok.decode([t for t, m in zip(row["input_ids"], row["completion_mask"], strict=True) if m])
    skipped = tok.decode([t for t, m in zip(row["input_ids"], row["completion_mask"], strict=True) if not m])
    assert '"name": "track", "arguments": {"order_id": "3"}' in learnt  # the earlier call
    assert "Order 3 has shipped." in learnt  # the target
    assert "Where is order 3?" in skipped and '"status": "shipped"' in skipped and "Where is order 3?" not in learnt
    assert '"status": "shipped"' not in learnt and "# Tools" not in learnt
