"""The demo's tool-calling task: its coverage data, its checker and its simulated service LLM."""

import json
import random
from importlib import resources
from pathlib import Path

from llamaduo import structure, synth
from llamaduo.config import DataConfig
from llamaduo.coverage import load_coverage
from llamaduo.demo.tools_task import (
    NAMES,
    REASONS,
    check,
    coverage_records,
    make_call,
    simulator_responder,
    solve,
    write_coverage,
)
from llamaduo.tools import tool_call_text

SHIPPED = Path(str(resources.files("llamaduo.demo").joinpath("data/tools.jsonl")))


def call(name, **args):
    return tool_call_text(name, args)


def test_the_shipped_coverage_file_is_what_the_generator_writes_and_loads_with_its_tools(tmp_path):
    assert write_coverage(tmp_path / "tools.jsonl").read_text() == SHIPPED.read_text()
    cov = load_coverage(SHIPPED, DataConfig(), check=structure.check)
    assert len(cov.examples) == 200
    for ex in cov.examples:
        target = ex.messages[-1]
        assert (ex.tool_choice, ex.parallel_tool_calls) == ("required", False)
        assert {t["function"]["name"] for t in ex.tools} == NAMES
        assert len(target.tool_calls) == 1 and target.tool_calls[0].function.name == ex.category
        args = json.loads(target.tool_calls[0].function.arguments)
        assert args["order_id"] in ex.prompt and args.get("city", "") in ex.prompt
        assert args.get("reason", "damaged") in REASONS


def test_records_are_openai_fine_tuning_lines_with_an_assistant_call():
    rec = coverage_records(3, seed=0)[1]
    assistant = rec["messages"][-1]
    assert assistant["role"] == "assistant" and assistant["content"] is None
    assert assistant["tool_calls"][0]["type"] == "function"
    assert isinstance(assistant["tool_calls"][0]["function"]["arguments"], str)
    assert rec["tool_choice"] == "required" and rec["parallel_tool_calls"] is False


def test_checker_gives_full_marks_to_the_reference_call_and_less_for_each_mistake():
    ref = call("refund_order", order_id="12345", reason="late")
    assert check(ref, ref)[:2] == (100, 100)
    assert check(ref, "I will refund it")[1] == 1  # no call at all
    one_wrong = check(ref, call("refund_order", order_id="12345", reason="damaged"))
    assert one_wrong[1] == 70 and "wrong: reason" in one_wrong[2]
    wrong_function = check(ref, call("track_order", order_id="12345"))
    assert wrong_function[1] == 20 and "needs refund_order" in wrong_function[2]
    assert check(ref, call("track_order", order_id="99999"))[1] < wrong_function[1] < one_wrong[1]


def test_simulated_judge_parses_the_candidate_call_from_the_text_it_is_sent():
    ref = call("change_address", order_id="55555", city="Lyon")
    body = {"messages": [{"role": "user", "content": f"<reference>\n{ref}\n</reference>\n<candidate>\n{ref}\n</candidate>"}]}
    assert json.loads(simulator_responder(body))["precision"]["score"] == 100
    body["messages"][0]["content"] = f"<reference>\n{ref}\n</reference>\n<candidate>\nno call\n</candidate>"
    assert json.loads(simulator_responder(body))["precision"]["score"] == 1


def test_simulated_service_answers_its_own_messages_with_the_right_call():
    rng = random.Random(4)
    for _ in range(60):
        message, name, args = make_call(rng)
        assert solve(message) == (name, args), message
    reply = simulator_responder({"messages": [{"role": "user", "content": "Where is order 10203?"}]})
    assert reply == call("track_order", order_id="10203")


def test_simulated_synthesis_replies_are_valid_calls_of_the_seeds_function():
    seed = next(e for e in load_coverage(SHIPPED, DataConfig()).examples if e.category == "refund_order")
    messages = synth.render_synth_prompt(seed, "refunds", 4)
    body = {"messages": messages}
    reply = simulator_responder(body)
    assert reply == simulator_responder(body)  # the same request, the same pairs
    pairs = synth.StructuredPairs.model_validate_json(reply).contents
    assert len(pairs) == 4
    for pair in pairs:
        assert [c.name for c in pair.tool_calls] == [seed.category]
        text = tool_call_text(pair.tool_calls[0].name, pair.tool_calls[0].arguments)
        assert structure.answer_problem(seed, text) is None

