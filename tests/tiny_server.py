"""Helpers for the server's tests: a briefly trained tiny model, its generator, an app, a client."""

from __future__ import annotations

import openai
import pytest

from llamaduo.batcher import local_generator
from llamaduo.config import Config, InferConfig, ServeConfig
from llamaduo.data import Message, make_example
from llamaduo.demo.tiny import build_tiny_model
from llamaduo.infer import generate
from llamaduo.models import load_model
from llamaduo.serve import BackgroundServer, create_app
from llamaduo.train import train

DEFAULTS = InferConfig(temperature=0.0, max_new_tokens=16, num_samples=1)
QUESTIONS = ["Order 3 mugs", "Omar", "Hello, this is Lukas from Graz. Please send me two water bottles.", "Anna"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model after a few seconds of training, so greedy answers are visible, prompt-dependent text."""
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_model(root / "base")
    examples = [make_example(f"Order {i} mugs", f'{{"item": "mug", "quantity": {i}}}') for i in range(1, 9)]
    examples += [make_example(w, f"Hello {w}!") for w in ("Anna", "Omar", "Lukas", "Sofia")]
    train_cfg = {"method": "full", "learning_rate": 3e-3, "max_steps": 60, "batch_size": 8, "max_length": 64,
                 "warmup_ratio": 0.0, "logging_steps": 100}
    train(Config(model={"base": str(base)}, train=train_cfg), examples, root / "model", progress=False)
    model, tok = load_model(Config(model={"base": str(root / "model")}).model)
    return root / "model", model, tok


@pytest.fixture(scope="module")
def gen(tiny):
    _, model, tok = tiny
    return local_generator(model, tok)


def direct(tiny, question: str, max_new_tokens: int = 16) -> str:
    _, model, tok = tiny
    sampling = DEFAULTS.model_copy(update={"max_new_tokens": max_new_tokens, "batch_size": 1})
    [c] = generate(model, tok, [("q", [Message(role="user", content=question)])], sampling)
    return c.text


def running(generator, cfg: ServeConfig | None = None, **kw) -> BackgroundServer:
    app = create_app(generator, cfg or ServeConfig(), "tiny-student", defaults=DEFAULTS, **kw)
    return BackgroundServer(app, model_name="tiny-student")


def client(srv: BackgroundServer, key: str = "not-needed") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """The tiny model as initialised, never trained: left alone it writes noise."""
    base = build_tiny_model(tmp_path_factory.mktemp("untrained") / "base")
    return load_model(Config(model={"base": str(base)}).model)


def structured(model_and_tokenizer, cfg: ServeConfig | None = None, **kw) -> BackgroundServer:
    """A server whose generator decodes under grammars (it has the tokenizer): structured output, tools."""
    model, tok = model_and_tokenizer
    app = create_app(local_generator(model, tok), cfg or ServeConfig(), "tiny-student", defaults=DEFAULTS,
                     tokenizer=tok, **kw)
    return BackgroundServer(app, model_name="tiny-student")
