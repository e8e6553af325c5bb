"""accept: judge what an endpoint serves like a round, and compare it with the best round."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaduo.config import Config
from llamaduo.data import make_example
from llamaduo.files import write_jsonl
from llamaduo.store import RunStore


def accept_run(root: Path) -> tuple[Config, RunStore, dict[str, str]]:
    """A run whose best round answered every test prompt with its reference, judged by token overlap."""
    cfg = Config(
        name="accept-run", runs_dir=root, seed=3,
        infer={"num_samples": 2, "temperature": 0.0, "max_new_tokens": 16},
        judge={"judgments_per_candidate": 2, "temperature": 0.0},
    )
    store = RunStore(cfg.run_dir)
    test = [make_example(f"Order {n} {item}", f'{{"item": "{item}", "quantity": {n}}}') for n, item in
            [(2, "mugs"), (3, "lamps"), (5, "cases"), (7, "pens"), (4, "cups"), (6, "mats")]]
    write_jsonl(store.test_path, test)
    store.init_manifest(cfg.seed)
    store.update_manifest(best_round=0)
    return cfg, store, {e.prompt: e.response for e in test}


def judge_round(cfg: Config, store: RunStore, client, answers: dict[str, str]) -> None:
    from llamaduo.artifacts import Completion
    from llamaduo.data import load_examples
    from llamaduo.evaluate import evaluate

    test = load_examples(store.test_path)
    preds = [Completion(prompt_id=e.id, sample_index=k, text=answers[e.prompt]) for e in test for k in range(2)]
    evaluate(cfg, client, store, 0, test, preds)


def student(answers: dict[str, str]):
    """A server-side generator that answers each prompt from a table (K copies per prompt)."""

    def gen(prompts, sampling, seed):
        return [type("Out", (), {"text": answers.get(m[-1].content, "no idea")})()
                for _, m in prompts for _ in range(sampling.num_samples)]

    return gen


@pytest.fixture
def judge_service(tmp_path):
    from llamaduo.demo.simulator import SimulatedService
    from llamaduo.service import ServiceClient
    from tests.conftest import overlap_judge, service_config

    with SimulatedService(overlap_judge) as svc:
        client = ServiceClient(service_config(svc), db_path=tmp_path / "service.sqlite")
        yield client
        client.close()


def test_accept_of_a_faithful_server_matches_the_best_round(tmp_path, judge_service):
    from llamaduo.accept import accept
    from llamaduo.config import ServeConfig
    from llamaduo.serve import BackgroundServer, create_app

    cfg, store, answers = accept_run(tmp_path)
    judge_round(cfg, store, judge_service, answers)
    with BackgroundServer(create_app(student(answers), ServeConfig(), "accept-run")) as srv:
        res = accept(cfg, store, srv.base_url, judge_service)
    assert res.model == "accept-run" and res.round == 0 and res.prompts == 6 and res.candidates == 12
    assert res.served_value == res.round_value and res.difference == 0.0 and res.ci_low <= 0 <= res.ci_high
    for name in ("predictions.jsonl", "judgments.jsonl", "scores.json", "comparison.json"):
        assert (store.accept_dir / name).exists(), name
    # Its K answers to one prompt are identical (greedy): each prompt's answer is judged once, M times.
    assert len((store.accept_dir / "judgments.jsonl").read_text().splitlines()) == 6 * 2


def test_accept_catches_a_served_model_that_lost_quality(tmp_path, judge_service):
    from llamaduo.accept import accept
    from llamaduo.demo.simulator import SimulatedService

    cfg, store, answers = accept_run(tmp_path)
    judge_round(cfg, store, judge_service, answers)
    # A third-party server that ignores `n` and answers badly for two prompts in three.
    degraded = {p: (a if i % 3 == 0 else "sorry") for i, (p, a) in enumerate(answers.items())}
    with SimulatedService(lambda req: degraded[req["messages"][-1]["content"]]) as endpoint:
        res = accept(cfg, store, endpoint.base_url, judge_service, model="served")
        calls = endpoint.count
    assert calls == 6 * 2  # one choice per call, so K calls per prompt
    assert res.served_value < res.round_value and res.difference < 0 and res.ci_high < 0
    assert "scores LOWER than the round" in res.summary()


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
ORDER = {"type": "object", "properties": {"item": {"type": "string"}, "quantity": {"type": "integer"}},
         "required": ["item", "quantity"], "additionalProperties": False}


def structured_run(root: Path) -> tuple[Config, RunStore, list]:
    """A run whose test split calls a tool (after an earlier call and its result) or answers JSON of a schema."""
    from llamaduo.data import Example, Message, ToolCall

    cfg = Config(name="structured-run", runs_dir=root, seed=3,
                 infer={"num_samples": 1, "temperature": 0.0, "max_new_tokens": 160},
                 judge={"judgments_per_candidate": 1, "temperature": 0.0})
    store = RunStore(cfg.run_dir)
    call = ToolCall(id="call_1", function={"name": "get_weather", "arguments": '{"city": "Graz", "unit": "c"}'})
    test = [
        Example(id=f"t{city}", tools=TOOLS, tool_choice="required", messages=[
            Message(role="user", content=f"Weather in {city}, then in Graz?"),
            Message(role="assistant", content="", tool_calls=[call.model_copy(update={"id": "call_0"})]),
            Message(role="tool", content='{"temp": 21}', tool_call_id="call_0"),
            Message(role="assistant", content="", tool_calls=[call])])
        for city in ("Wien", "Linz")
    ] + [
        Example(id="order", response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER,
                                                                                      "strict": True}},
                messages=[Message(role="user", content="Order 3 mugs"),
                          Message(role="assistant", content='{"item": "mug", "quantity": 3}')])
    ]
    write_jsonl(store.test_path, test)
    store.init_manifest(cfg.seed)
    store.update_manifest(best_round=0)
    return cfg, store, test


def test_accept_sends_the_tasks_tools_and_schema_and_reads_calls_back_as_infer_writes_them(tmp_path, judge_service):
    """Against a real `serve` on the tiny model: the served answers are the infer stage's answers, text for text."""
    from llamaduo.accept import accept
    from llamaduo.artifacts import Completion
    from llamaduo.config import ServeConfig
    from llamaduo.demo.tiny import build_tiny_model
    from llamaduo.evaluate import evaluate
    from llamaduo.infer import generate, stop_token_ids, structured_prompts
    from llamaduo.models import load_model
    from llamaduo.scheduler import Scheduler
    from llamaduo.serve import BackgroundServer, create_app
    from llamaduo.structure import answer_problem

    cfg, store, test = structured_run(tmp_path)
    evaluate(cfg, judge_service, store, 0, test,
             [Completion(prompt_id=e.id, sample_index=0, text=e.response) for e in test])
    model, tok = load_model(Config(model={"base": str(build_tiny_model(tmp_path / "base"))}).model)
    prompts, constraints = structured_prompts(tok, test, stop_token_ids(model, tok), cfg.infer.max_new_tokens)
    inferred = {c.prompt_id: c.text for c in generate(model, tok, prompts, cfg.infer, seed=cfg.seed,
                                                       constraints=constraints)}
    app = create_app(Scheduler(model, tok, 8), ServeConfig(), "structured-run", defaults=cfg.infer, tokenizer=tok)
    with BackgroundServer(app, model_name="structured-run") as srv:
        res = accept(cfg, store, srv.base_url, judge_service)
    served = {p.prompt_id: p.text for p in store.read_predictions("accept")}
    assert res.prompts == 3 and served == inferred
    by_id = {e.id: e for e in test}
    for pid, text in served.items():  # an untrained model, yet every answer has the task's structure
        assert answer_problem(by_id[pid], text) is None, (pid, text)
    assert served["tWien"].startswith('<tool_call>\n{"name": "get_weather", "arguments": {')
