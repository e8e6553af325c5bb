"""Synthesis: the prompt, seed sampling, validation and lineage, through the real client and a loopback generator."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from collections import Counter
from importlib import resources

import pytest

from llamaduo import synth
from llamaduo.config import Config
from llamaduo.data import make_example
from llamaduo.errors import UserError
from llamaduo.service import ServiceClient
from tests.conftest import service_config
from tests.test_judge import check_golden

TRAIN = [make_example(f"Summarise note {i}: the meeting moved to room {i}.", f"Meeting now in room {i}.", category="Summarize")
         for i in range(6)] + [
    make_example(f"Is review {i} positive? 'Loved it, {i} stars.'", "positive", category="Classify", system="Answer with one word.")
    for i in range(3)
] + [make_example("Extract the city: 'Flying to Oslo on Monday.'", "Oslo", category="Extract")]
TEST = [make_example("Summarise note 99: lunch is at noon.", "Lunch at noon.", category="Summarize"),
        make_example("Is review 99 positive? 'Awful.'", "negative", category="Classify")]


def seed_of(req: dict) -> tuple[str, str]:
    text = req["messages"][-1]["content"]
    instr = re.search(r"<example_instruction>\n(.*?)\n</example_instruction>", text, re.S).group(1)
    resp = re.search(r"<example_response>\n(.*?)\n</example_response>", text, re.S).group(1)
    return instr, resp


def varied_generator():
    """New pairs derived from the seed in the prompt; a counter makes every call's pairs differ."""
    calls = itertools.count()

    def responder(req: dict) -> str:
        n = int(re.search(r"Write (\d+) new", req["messages"][-1]["content"]).group(1))
        instr, resp = seed_of(req)
        c = next(calls)
        return json.dumps({"contents": [{"instruction": f"{instr} (variant {c}.{i})", "response": f"{resp} [{c}.{i}]"}
                                        for i in range(n)]})

    return responder


def make_cfg(svc, **synth_kw) -> Config:
    return Config(service=service_config(svc).model_dump(), synth={"pairs_per_call": 3, "model": "gen-model", **synth_kw})


def test_synth_prompt_matches_golden():
    seed = make_example("Write a haiku about rain.", "Soft rain on tin roofs\nthe gutters hum a low tune\nsleep comes easily")
    check_golden("synth_prompt.txt", synth.render_synth_prompt(seed, "short poems", 5))


def test_synthesized_pairs_carry_lineage_and_the_seed_category(fake_service):
    fake_service.responder = varied_generator()
    cfg = make_cfg(fake_service, topics={"Classify": "sentiment of product reviews"})
    res = synth.synthesize(cfg, ServiceClient(cfg.service), TRAIN, 10, round=2, rng=random.Random(0))
    assert res.calls == math.ceil(10 / 3) == fake_service.count
    assert len(res.examples) == 10
    assert [r["reason"] for r in res.rejected] == ["surplus", "surplus"]  # 4 calls × 3 pairs, 10 asked for
    template_hash = hashlib.sha256(resources.files("llamaduo").joinpath("prompts/synth.jinja").read_bytes()).hexdigest()[:16]
    by_id = {e.id: e for e in TRAIN}
    for ex in res.examples:
        lin = ex.lineage
        assert (lin.source, lin.round, lin.generator, lin.template_hash) == ("synthetic", 2, "gen-model", template_hash)
        seed = by_id[lin.seed_id]
        assert ex.category == seed.category and ex.prompt.startswith(seed.prompt)
        assert [m.role for m in ex.messages] == [m.role for m in seed.messages]  # the seed's system prompt comes along
    bodies = [r["body"] for r in fake_service.requests]
    assert all(b["model"] == "gen-model" and b["temperature"] == 1.0 for b in bodies)
    classify = [b for b in bodies if "Is review" in b["messages"][-1]["content"]]
    assert classify and all("Task topic: sentiment of product reviews" in b["messages"][-1]["content"] for b in classify)


def test_seeds_come_only_from_what_is_passed_never_the_test_split(fake_service):
    fake_service.responder = varied_generator()
    cfg = make_cfg(fake_service)
    res = synth.synthesize(cfg, ServiceClient(cfg.service), TRAIN, 30, round=1, rng=random.Random(1))
    used = {e.lineage.seed_id for e in res.examples}
    assert used <= {e.id for e in TRAIN} and not used & {e.id for e in TEST}
    sent = "\n".join(m["content"] for r in fake_service.requests for m in r["body"]["messages"])
    assert not any(t.prompt in sent or t.response in sent for t in TEST)
    assert len(used) == len(TRAIN)  # 10 calls over 10 seeds: each used once


def test_invalid_pairs_are_rejected_with_their_reasons(fake_service):
    seed = TRAIN[0]

    def responder(req):
        return json.dumps({"contents": [
            {"instruction": "Summarise note 7: the bus leaves at nine.", "response": "Bus at nine."},
            {"instruction": "   ", "response": "An answer without a question."},
            {"instruction": "Summarise note 8: rain.", "response": "Ok"},
            {"instruction": "Summarise note 9: " + "very " * 60, "response": "Too long a question."},
            {"instruction": seed.prompt.upper(), "response": "The same instruction as the seed."},
            {"instruction": "summarise note 7:  the bus leaves at nine.", "response": "bus at nine."},
            {"instruction": "Extract the fields as JSON: 'Ana, Rome'", "response": {"name": "Ana", "city": "Rome"}},
        ]})

    fake_service.responder = responder
    cfg = make_cfg(fake_service, pairs_per_call=7, min_chars=3, max_chars=200)
    res = synth.synthesize(cfg, ServiceClient(cfg.service), [seed], 7, round=1, rng=random.Random(0))
    assert [r["reason"] for r in res.rejected] == [
        "empty_instruction", "response_too_short", "instruction_too_long", "copy_of_seed", "duplicate_in_batch",
    ]
    assert all(r["seed_id"] == seed.id and r["round"] == 1 for r in res.rejected)
    assert [e.response for e in res.examples] == ["Bus at nine.", '{"name": "Ana", "city": "Rome"}']


def test_a_failed_call_becomes_a_rejected_row_and_the_others_still_count(fake_service):
    def responder(req):
        if "Extract the city" in json.dumps(req):
            return "Sure! Here are some pairs: instruction one, response one."
        return varied_generator()(req)

    fake_service.responder = responder
    cfg = make_cfg(fake_service)
    res = synth.synthesize(cfg, ServiceClient(cfg.service), TRAIN, 30, round=1, rng=random.Random(3))
    failed = [r for r in res.rejected if r["reason"] == "call_failed"]
    assert len(failed) == 1 and failed[0]["seed_id"] == TRAIN[-1].id and "SynthPairs" in failed[0]["error"]
    assert len(res.examples) == 27 and not any(e.category == "Extract" for e in res.examples)


def test_seed_sampling_is_stratified_without_replacement_and_can_be_weighted():
    rng = random.Random(0)
    picked = synth.pick_seeds(TRAIN, 10, rng)
    assert Counter(e.category for e in picked) == {"Summarize": 6, "Classify": 3, "Extract": 1}
    assert len({e.id for e in picked}) == 10  # no seed twice before all were used
    assert {e.category for e in picked[:3]} == {"Summarize", "Classify", "Extract"}  # interleaved
    twice = synth.pick_seeds(TRAIN, 20, rng)
    assert set(Counter(e.id for e in twice).values()) == {2}  # cycled once every seed was used
    weighted = synth.pick_seeds(TRAIN, 20, rng, weights={"Summarize": 1.0, "Classify": 10.0})
    counts = Counter(e.category for e in weighted)
    assert counts["Classify"] > counts["Summarize"] and counts["Extract"] >= 1
    assert synth.pick_seeds(TRAIN, 10, random.Random(5)) == synth.pick_seeds(TRAIN, 10, random.Random(5))


def test_without_seeds_synthesis_stops_with_a_clear_error(fake_service):
    cfg = make_cfg(fake_service)
    with pytest.raises(UserError, match="train split is empty"):
        synth.synthesize(cfg, ServiceClient(cfg.service), [], 5, round=1, rng=random.Random(0))
    assert synth.synthesize(cfg, ServiceClient(cfg.service), TRAIN, 0, round=1, rng=random.Random(0)).examples == []
    assert fake_service.count == 0


# ------------------------------------------------------------------ structured seeds
ROUTE_TOOLS = [{"type": "function", "function": {"name": "track_order", "description": "Where an order is", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"], "additionalProperties": False}}}]
CITY_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}


def tool_seed():
    from llamaduo.data import Example, FunctionCall, Message, ToolCall

    call = ToolCall(id="call_0", function=FunctionCall(name="track_order", arguments='{"order_id": "10001"}'))
    msgs = [Message(role="user", content="Where is order 10001?"), Message(role="assistant", content="", tool_calls=[call])]
    return Example(id="seed-tool", messages=msgs, category="track", tools=ROUTE_TOOLS, tool_choice="required",
                   parallel_tool_calls=False)


def schema_seed():
    return make_example("Which city: 'Flying to Oslo on Monday.'", '{"city": "Oslo"}', category="Extract").model_copy(
        update={"response_format": CITY_FORMAT})


def test_a_tool_seeds_prompt_shows_its_tools_and_asks_for_calls_matches_golden():
    check_golden("synth_prompt_tools.txt", synth.render_synth_prompt(tool_seed(), "order status questions", 3))


def test_a_schema_seeds_prompt_shows_its_schema_and_asks_for_the_object_itself():
    system, user = synth.render_synth_prompt(schema_seed(), "cities", 2)
    assert '{"type": "object", "properties": {"city": {"type": "string"}}' in system["content"]
    assert '"response": {"<key>": "<value>"}' in system["content"]
    assert '{"city": "Oslo"}' in user["content"]


def test_synthetic_pairs_of_a_tool_seed_are_calls_carrying_its_tools_and_invalid_ones_are_rejected_with_why(fake_service):
    def responder(req):
        return json.dumps({"contents": [
            {"instruction": "Has order 20002 shipped?", "tool_calls": [{"name": "track_order", "arguments": {"order_id": "20002"}}]},
            {"instruction": "Order 30003 status?", "tool_calls": [{"name": "track_order", "arguments": '{"order_id": "30003"}'}]},
            {"instruction": "Cancel order 40004.", "tool_calls": [{"name": "cancel_order", "arguments": {"order_id": "40004"}}]},
            {"instruction": "Where is order 50005?", "tool_calls": [{"name": "track_order", "arguments": {"order": 50005}}]},
            {"instruction": "Where is my parcel?", "response": "Please give me your order number."},
        ]})

    fake_service.responder = responder
    cfg = make_cfg(fake_service, pairs_per_call=5)
    res = synth.synthesize(cfg, ServiceClient(cfg.service), [tool_seed()], 5, round=1, rng=random.Random(0))
    assert [e.prompt for e in res.examples] == ["Has order 20002 shipped?", "Order 30003 status?"]
    for ex in res.examples:
        assert (ex.tools, ex.tool_choice, ex.parallel_tool_calls) == (ROUTE_TOOLS, "required", False)
        assert ex.messages[-1].tool_calls[0].function.name == "track_order" and not ex.messages[-1].content
        assert ex.response.startswith('<tool_call>\n{"name": "track_order", "arguments": {"order_id": "')
    assert len({e.id for e in res.examples}) == 2
    bad = {r["instruction"]: r for r in res.rejected}
    assert {r["reason"] for r in res.rejected} == {"invalid_structure"}
    assert "makes none" in bad["Cancel order 40004."]["error"]  # cancel_order is not offered
    assert "track_order arguments do not match" in bad["Where is order 50005?"]["error"]
    assert "makes none" in bad["Where is my parcel?"]["error"]  # tool_choice required
    sent = fake_service.requests[0]["body"]
    assert '"name": "track_order"' in sent["messages"][0]["content"]


def test_synthetic_pairs_of_a_schema_seed_carry_its_format_and_answers_off_schema_are_rejected(fake_service):
    fake_service.responder = lambda req: json.dumps({"contents": [
        {"instruction": "Which city: 'Off to Lima in May.'", "response": {"city": "Lima"}},
        {"instruction": "Which city: 'Rome, then home.'", "response": {"town": "Rome"}},
        {"instruction": "Which city: 'Back in Kyiv.'", "response": "Kyiv"},
    ]})
    cfg = make_cfg(fake_service)
    res = synth.synthesize(cfg, ServiceClient(cfg.service), [schema_seed()], 3, round=1, rng=random.Random(0))
    assert [(e.response, e.response_format) for e in res.examples] == [('{"city": "Lima"}', CITY_FORMAT)]
    assert [(r["reason"], r["response"]) for r in res.rejected] == [
        ("invalid_structure", '{"town": "Rome"}'), ("invalid_structure", "Kyiv")]
    assert "'city' is a required property" in res.rejected[0]["error"] and "not JSON" in res.rejected[1]["error"]
