import json
import random

from llamaduo.demo.task import KEYS, check, coverage_records, make_pair, simulator_responder


def test_shipped_style_records_are_valid_json_answers_with_every_key():
    for rec in coverage_records(30, seed=1):
        answer = json.loads(rec["response"])
        assert set(answer) == set(KEYS)
        assert answer["intent"] == rec["category"]
        assert answer["name"] in rec["prompt"] and answer["city"] in rec["prompt"]


def test_checker_gives_full_marks_to_the_reference_and_little_to_noise():
    _, ref, _ = make_pair(random.Random(3))
    assert check(ref, ref)[:2] == (100, 100)
    assert check(ref, "no idea")[1] == 1
    partial = json.loads(ref)
    partial["city"] = "Nowhere"
    sim, prec, reason = check(ref, json.dumps(partial))
    assert prec == 20 + 80 * 4 // 5 and "wrong: city" in reason


def test_simulated_judge_scores_from_the_text_it_is_sent():
    _, ref, _ = make_pair(random.Random(5))
    body = {"messages": [{"role": "user", "content": f"<reference>\n{ref}\n</reference>\n<candidate>\n{ref}\n</candidate>"}]}
    good = json.loads(simulator_responder(body))
    body["messages"][0]["content"] = f"<reference>\n{ref}\n</reference>\n<candidate>\nwrong\n</candidate>"
    bad = json.loads(simulator_responder(body))
    assert good["precision"]["score"] == 100 and bad["precision"]["score"] == 1


def test_simulated_generator_is_deterministic_per_request_and_follows_the_seed_intent():
    body = {"messages": [{"role": "user", "content": 'Seed: {"intent": "cancel", "name": "A B"}. Write 3 new pairs. Reply {"contents": [...]}'}]}
    a = json.loads(simulator_responder(body))["contents"]
    b = json.loads(simulator_responder(body))["contents"]
    assert a == b and len(a) == 3
    assert all(json.loads(p["response"])["intent"] == "cancel" for p in a)


def test_shipped_orders_are_valid_under_the_tasks_response_schema_and_synthesis_answers_with_objects():
    from importlib import resources
    from pathlib import Path

    from llamaduo import structure, synth
    from llamaduo.config import DataConfig
    from llamaduo.coverage import load_coverage
    from llamaduo.demo.task import RESPONSE_FORMAT

    shipped = Path(str(resources.files("llamaduo.demo").joinpath("data/orders.jsonl")))
    cov = load_coverage(shipped, DataConfig(response_format=RESPONSE_FORMAT), check=structure.check)
    seed = cov.examples[0]
    assert seed.response_format == RESPONSE_FORMAT
    reply = json.loads(simulator_responder({"messages": synth.render_synth_prompt(seed, "orders", 3)}))
    for pair in reply["contents"]:
        assert isinstance(pair["response"], dict) and pair["response"]["intent"] == seed.category
        assert structure.answer_problem(seed, json.dumps(pair["response"])) is None
