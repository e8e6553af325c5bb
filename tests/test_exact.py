"""Exact metrics beside the judge: planted candidates measure as expected, rates aggregate with
prompt-level CIs, free text is n/a, and an exact metric can be (part of) the pass rule."""

from __future__ import annotations

import io
import json

import pytest

from llamaduo import exact, loop, scoring
from llamaduo.artifacts import Completion, MetricStats, Scores
from llamaduo.config import ConfigError, PassRule, from_dict
from llamaduo.data import Example, FunctionCall, Message, ToolCall, make_example, tool_call_text
from llamaduo.progress import format_event
from llamaduo.store import RunStore

ORDER = {"type": "object", "properties": {"city": {"type": "string"}, "quantity": {"type": "integer"}},
         "required": ["city", "quantity"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER}}
TOOLS = [
    {"type": "function", "function": {"name": "refund", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string"}, "city": {"type": "string"}},
        "required": ["order_id"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "track", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
]


def schema_example(pid: str = "s1") -> Example:
    return Example(id=pid, response_format=FORMAT, messages=[
        Message(role="user", content="Two mugs to Leeds"),
        Message(role="assistant", content='{"city": "Leeds", "quantity": 2}')])


def tool_example(pid: str = "t1") -> Example:
    call = ToolCall(id="call_1", function=FunctionCall(name="refund", arguments=json.dumps({"order_id": "17", "city": "Leeds"})))
    return Example(id=pid, tools=TOOLS, messages=[
        Message(role="user", content="Refund order 17 from Leeds"), Message(role="assistant", content="", tool_calls=[call])])


def metrics(example: Example, text: str) -> tuple[dict, str | None]:
    got = exact.candidate_metrics(example, text)
    return got.values(), got.failure


# ------------------------------------------------------------------ one candidate
def test_a_valid_json_answer_with_every_field_right_scores_one_and_tool_metrics_are_na():
    values, failure = metrics(schema_example(), '{"quantity": 2, "city": "Leeds"}')
    assert values == {"json_valid": 1.0, "schema_valid": 1.0, "tool_name_match": None, "arguments_exact": None,
                      "field_accuracy": 1.0}
    assert failure is None


def test_a_json_answer_with_a_wrong_field_is_valid_and_half_accurate():
    values, failure = metrics(schema_example(), '{"city": "Lyon", "quantity": 2}')
    assert (values["json_valid"], values["schema_valid"], values["field_accuracy"]) == (1.0, 1.0, 0.5)
    assert failure == "field city: 'Lyon' instead of 'Leeds'"


def test_an_answer_that_is_not_json_fails_every_measure_that_applies():
    values, failure = metrics(schema_example(), '{"city": "Leeds", "quantity": 2')
    assert (values["json_valid"], values["schema_valid"], values["field_accuracy"]) == (0.0, 0.0, 0.0)
    assert failure.startswith("not JSON")


def test_json_of_the_wrong_schema_parses_but_is_not_schema_valid():
    values, failure = metrics(schema_example(), '{"city": "Leeds", "quantity": "2"}')
    assert (values["json_valid"], values["schema_valid"], values["field_accuracy"]) == (1.0, 0.0, 0.5)
    assert "is not of type 'integer'" in failure and "quantity" in failure


def test_the_right_call_matches_name_and_arguments_exactly():
    ex = tool_example()
    values, failure = metrics(ex, ex.response)
    assert values == {"json_valid": 1.0, "schema_valid": 1.0, "tool_name_match": 1.0, "arguments_exact": 1.0,
                      "field_accuracy": 1.0}
    assert failure is None


def test_a_call_to_the_wrong_tool_is_valid_but_matches_nothing():
    values, failure = metrics(tool_example(), tool_call_text("track", {"order_id": "17"}))
    assert values == {"json_valid": 1.0, "schema_valid": 1.0, "tool_name_match": 0.0, "arguments_exact": 0.0,
                      "field_accuracy": 0.0}
    assert failure == "wrong tool: track instead of refund"


def test_a_wrong_argument_keeps_the_name_and_costs_exactness_and_its_field():
    values, failure = metrics(tool_example(), tool_call_text("refund", {"order_id": "17", "city": "Lyon"}))
    assert (values["tool_name_match"], values["arguments_exact"], values["field_accuracy"]) == (1.0, 0.0, 0.5)
    assert failure == "argument city: 'Lyon' instead of 'Leeds'"


def test_a_call_block_that_is_not_json_is_neither_json_nor_schema_valid():
    values, failure = metrics(tool_example(), '<tool_call>\n{"name": "refund", "arguments": {"order_id": 17\n</tool_call>')
    assert (values["json_valid"], values["schema_valid"], values["tool_name_match"]) == (0.0, 0.0, 0.0)
    assert failure.startswith("a tool call is not JSON")


def test_arguments_against_the_parameters_and_calls_to_unoffered_tools_are_not_schema_valid():
    values, failure = metrics(tool_example(), tool_call_text("refund", {"order_id": 17}))
    assert (values["json_valid"], values["schema_valid"]) == (1.0, 0.0) and "refund arguments" in failure
    values, failure = metrics(tool_example(), tool_call_text("delete_account", {}))
    assert values["schema_valid"] == 0.0 and failure == "calls 'delete_account', which is not an offered tool"


def test_an_answer_without_the_expected_call_has_no_valid_structure():
    values, failure = metrics(tool_example(), "I have refunded it.")
    assert (values["json_valid"], values["tool_name_match"], values["arguments_exact"]) == (0.0, 0.0, 0.0)
    assert failure == "no call instead of refund"


def test_a_free_text_example_has_no_exact_metric_at_all():
    values, failure = metrics(make_example("Say hi", "hi"), "hello")
    assert set(values.values()) == {None} and failure is None


def test_json_equality_keeps_booleans_apart_from_numbers():
    assert exact.json_equal({"a": 1, "b": [True]}, {"b": [True], "a": 1.0})
    assert not exact.json_equal(True, 1) and not exact.json_equal(0, False) and not exact.json_equal("1", 1)


# ------------------------------------------------------------------ a judged set
def completions(pid: str, texts: list[str]) -> list[Completion]:
    return [Completion(prompt_id=pid, sample_index=i, text=t) for i, t in enumerate(texts)]


def test_rates_aggregate_with_a_prompt_level_ci_and_only_the_metrics_that_apply():
    test = [schema_example("s1"), schema_example("s2"), make_example("Say hi", "hi")]
    rows = (completions("s1", ['{"city": "Leeds", "quantity": 2}'] * 2)
            + completions("s2", ['{"city": "Leeds", "quantity": 2}', "not json"])
            + completions(test[2].id, ["hello"])
            + [Completion(prompt_id="s2", sample_index=2, text="", ok=False)])  # a failed call: never an answer
    stats = exact.exact_stats(rows, test)
    assert set(stats) == {"json_valid", "schema_valid", "field_accuracy"}  # tool metrics: n/a, absent
    sv = stats["schema_valid"]
    assert sv.n == 4 and sv.mean == 0.75 and sv.coverage_50 is None and sv.coverage_70 is None
    assert sv.ci == [0.5, 1.0]  # resampling whole prompts: s1 (1.0, 1.0) and s2 (1.0, 0.0)
    assert exact.exact_stats(completions(test[2].id, ["hello"]), test) == {}


def test_scores_with_exact_metrics_round_trip_and_old_files_read_without_them(tmp_path):
    store = RunStore(tmp_path / "run")
    store.root.mkdir()
    scores = Scores(exact={"schema_valid": MetricStats(n=2, mean=0.5, median=0.5, ci=[0.0, 1.0])})
    store.write_scores(0, scores)
    back = store.read_scores(0)
    assert back.exact == scores.exact and back.stat("schema_valid", "mean") == 0.5
    assert back.stat("arguments_exact", "mean") is None  # does not apply: n/a
    old = json.loads(store.scores_path(0).read_text())
    old.pop("exact")
    store.scores_path(0).write_text(json.dumps(old))
    assert store.read_scores(0).exact == {}


# ------------------------------------------------------------------ the pass rule
def rates(**means: float) -> Scores:
    return Scores(precision=MetricStats(n=4, mean=92.0), exact={m: MetricStats(n=4, mean=v) for m, v in means.items()})


def test_an_exact_metric_is_the_pass_rule_with_a_threshold_in_its_range():
    rule = PassRule(metric="schema_valid", threshold=0.99)
    assert scoring.evaluate_pass(rates(schema_valid=1.0), rule).passed
    d = scoring.evaluate_pass(rates(schema_valid=0.98), rule)
    assert not d.passed and d.value == 0.98 and d.failed == ["mean schema_valid"]


def test_a_threshold_outside_an_exact_metrics_range_is_a_clear_config_error():
    with pytest.raises(ValueError, match="outside schema_valid's range 0-1"):
        PassRule(metric="schema_valid")  # the judge's default 70
    with pytest.raises(ValueError, match="coverage@50 is a statistic of judge scores"):
        PassRule(metric="field_accuracy", statistic="coverage@50", threshold=0.5)
    with pytest.raises(ConfigError, match=r"also.*outside arguments_exact's range 0-1"):
        from_dict({"judge": {"pass_rule": {"also": [{"metric": "arguments_exact", "threshold": 95}]}}})
    with pytest.raises(ValueError, match="below the mean score's range 1-100"):
        PassRule(also=[{"metric": "precision", "threshold": 0.9}])


def test_the_judge_and_an_exact_metric_must_both_hold_and_the_decision_names_the_failed_one():
    rule = PassRule(metric="precision", threshold=90, also=[{"metric": "schema_valid", "threshold": 0.99}])
    ok = scoring.evaluate_pass(rates(schema_valid=1.0), rule)
    assert ok.passed and ok.failed == [] and [d.metric for d in ok.also] == ["schema_valid"]
    d = scoring.evaluate_pass(rates(schema_valid=0.9), rule)
    assert not d.passed and d.failed == ["mean schema_valid"] and d.value == 92.0  # the main statistic
    assert "mean schema_valid 0.90 < 0.99" in d.reason and d.reason.endswith("not met: mean schema_valid")


def test_an_exact_metric_not_measured_fails_its_condition_and_says_so():
    rule = PassRule(metric="precision", threshold=90, also=[{"metric": "arguments_exact", "threshold": 0.5}])
    d = scoring.evaluate_pass(rates(schema_valid=1.0), rule)  # a schema task: no tool metrics
    assert not d.passed and d.failed == ["mean arguments_exact"]
    assert d.also[0].value is None and "not measured (n/a" in d.also[0].reason
    alone = scoring.evaluate_pass(Scores(), PassRule(metric="schema_valid", threshold=0.5))
    assert not alone.passed and alone.value is None and "so the rule is not met" in alone.reason


def test_the_judge_part_of_a_rule_is_what_judge_only_readers_use():
    assert PassRule(metric="schema_valid", threshold=0.9).judged() == PassRule()
    rule = PassRule(metric="schema_valid", threshold=0.9, also=[{"metric": "similarity", "threshold": 80}])
    assert (rule.judged().metric, rule.judged().threshold) == ("similarity", 80)


# ------------------------------------------------------------------ the round line
def test_a_structured_rounds_line_shows_its_exact_metrics_beside_the_judges_score():
    event = {"event": "round_done", "round": 1, "value": 81.5, "target": 90.0, "passed": False, "metric": "precision",
             "statistic": "mean", "spend_usd": 0.0, "exact": {"json_valid": 1.0, "schema_valid": 0.97, "field_accuracy": 0.8}}
    line = format_event(event)
    assert "precision mean = 81.5" in line and "schema_valid 0.97" in line and "field_accuracy 0.80" in line
    assert "arguments_exact" not in line  # a schema task
    tools = {**event, "exact": {"schema_valid": 1.0, "tool_name_match": 1.0, "arguments_exact": 0.5}}
    assert "arguments_exact 0.50" in format_event(tools) and "field_accuracy n/a" in format_event(tools)
    free = {k: v for k, v in event.items() if k != "exact"}
    assert "schema_valid" not in format_event(free)


def test_a_round_line_on_an_exact_rule_shows_the_rate_and_the_judges_score():
    line = format_event({"event": "round_done", "round": 0, "value": 0.96, "target": 0.5, "passed": True,
                         "metric": "schema_valid", "statistic": "mean", "exact": {"schema_valid": 0.96},
                         "judge": {"metric": "precision", "statistic": "mean", "value": 44.0}})
    assert "schema_valid mean = 0.96" in line and "(target 0.50)" in line and "precision mean 44.0" in line


# ------------------------------------------------------------------ the loop
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from llamaduo.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


EXTRACTION = {"type": "object", "additionalProperties": False,
              "required": ["intent", "name", "city", "item", "quantity"],
              "properties": {"intent": {"enum": ["order", "cancel", "return", "question"]}, "name": {"type": "string"},
                             "city": {"type": "string"}, "item": {"type": "string"}, "quantity": {"type": "integer"}}}


def test_schema_valid_as_the_pass_rule_stops_the_loop_in_the_first_round(tmp_path, fake_service, tiny_model):
    from tests.test_loop import make_config, responder

    fake_service.responder = responder
    fmt = {"type": "json_schema", "json_schema": {"name": "extraction", "schema": EXTRACTION, "strict": True}}
    cfg = make_config(tmp_path, fake_service, tiny_model, data={"response_format": fmt},
                      judge={"judgments_per_candidate": 1, "pass_rule": {"metric": "schema_valid", "threshold": 0.5}},
                      infer={"max_new_tokens": 96})
    events: list[dict] = []
    result = loop.run(cfg, display=events.append)
    # decoding under the schema makes every answer valid, whatever the tiny model learnt
    assert result.stop_reason == "target_met" and len(result.rounds) == 1
    scores = RunStore(cfg.run_dir).read_scores(0)
    assert scores.exact["schema_valid"].mean == 1.0 and scores.exact["json_valid"].mean == 1.0
    assert "arguments_exact" not in scores.exact and scores.precision.n > 0  # judged all the same
    done = next(e for e in events if e["event"] == "round_done")
    assert done["exact"]["schema_valid"] == 1.0 and done["judge"]["metric"] == "precision"
    assert "schema_valid" in RunStore(cfg.run_dir).report_md.read_text()
    from rich.console import Console

    from llamaduo import views

    con = Console(record=True, width=200, file=io.StringIO())
    con.print(views.status_table(cfg.run_dir))
    table = con.export_text()
    assert "schema_valid" in table and "field_accuracy" in table


def test_adding_a_condition_to_the_pass_rule_does_not_rerun_the_judge(tmp_path):
    from llamaduo.stages import Run

    cfg = from_dict({"runs_dir": str(tmp_path)})
    more = cfg.model_copy(deep=True)
    more.judge.pass_rule.also = [{"metric": "schema_valid", "threshold": 0.99}]
    assert Run(cfg).judge_request_components() == Run(more).judge_request_components()
