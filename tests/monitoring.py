"""Helpers for the monitoring tests: a service that answers and judges, a table-driven student, a served app."""

from __future__ import annotations

import random
from pathlib import Path

import openai

from llamaduo.config import Config, InferConfig
from llamaduo.drift import DriftMonitor
from llamaduo.monitor_store import MonitorStore
from llamaduo.serve import BackgroundServer, create_app
from llamaduo.service import ServiceClient
from llamaduo.shadow import ShadowSender
from tests.conftest import overlap_judge, service_config

DEFAULTS = InferConfig(temperature=0.0, max_new_tokens=32, num_samples=1)


def task_a(n: int) -> tuple[str, str]:
    """The task the student was trained on: it answers like the service does."""
    return f"Order {n} mugs for Anna", f'{{"item": "mug", "quantity": {n}, "name": "Anna"}}'


def task_b(n: int) -> tuple[str, str]:
    """Another task live traffic drifts to: the service knows it, the student does not."""
    return f"Translate sentence number {n} into French", f"Voici la phrase numéro {n} en français"


def service_answers(n: int = 200) -> dict[str, str]:
    return dict([task_a(i) for i in range(n)] + [task_b(i) for i in range(n)])


def responder(answers: dict[str, str]):
    """The service LLM: judges with token overlap, answers a prompt from its table."""

    def respond(req: dict) -> str:
        text = req["messages"][-1]["content"]
        if "<reference>" in "\n".join(m.get("content", "") for m in req["messages"]):
            return overlap_judge(req)
        return answers.get(text, "I do not know")

    return respond


def student(known: dict[str, str]):
    """A local generator answering prompts of task A like the service, anything else badly."""

    def gen(prompts, sampling, seed):
        return [type("Out", (), {"text": known.get(m[-1].content, "no idea at all"), "prompt_tokens": 7,
                                 "new_tokens": 5})()
                for _, m in prompts for _ in range(sampling.num_samples)]

    return gen


def config(svc, root: Path, **serve) -> Config:
    return Config(
        name="live", runs_dir=root, seed=0, service=service_config(svc).model_dump(),
        judge={"judgments_per_candidate": 1, "temperature": 0.0, "pass_rule": {"metric": "precision",
                                                                              "statistic": "mean", "threshold": 60}},
        serve={"monitor_window": 8, **serve},
    )


def sender(cfg: Config, root: Path, *, rate: float = 1.0, drift: bool = False, tracker=None, **kw):
    """A shadow sender with its own client and a monitoring store under `root` (and a drift monitor)."""
    store = MonitorStore(root / "monitor.sqlite")
    client = ServiceClient(cfg.service, db_path=root / "service.sqlite")
    monitor = DriftMonitor(cfg, store, tracker=tracker) if drift else None
    return ShadowSender(cfg, client, store, rate=rate, rng=random.Random(7), drift=monitor, **kw), store, monitor


def serve(gen, cfg: Config, **kw) -> BackgroundServer:
    return BackgroundServer(create_app(gen, cfg.serve, "tiny-student", defaults=DEFAULTS, **kw), model_name="tiny-student")


def ask(srv: BackgroundServer, prompt: str, key: str = "not-needed"):
    api = openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0)
    return api.chat.completions.with_raw_response.create(model="tiny-student",
                                                         messages=[{"role": "user", "content": prompt}])
