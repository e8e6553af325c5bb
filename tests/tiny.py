"""Helpers for tests of the local model stack: a tiny model built once, small examples, configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llamaduo.config import Config, from_dict
from llamaduo.data import Example, make_example

PAIRS = [
    ("Order two blue mugs for Maria in Lyon.", '{"intent": "order", "item": "blue mug", "quantity": 2}'),
    ("Cancel my desk lamp, Tom from Porto.", '{"intent": "cancel", "item": "desk lamp", "quantity": 1}'),
    ("I want to return 3 notebooks. Aisha, Leeds.", '{"intent": "return", "item": "notebook", "quantity": 3}'),
    ("Please send five phone cases to Graz.", '{"intent": "order", "item": "phone case", "quantity": 5}'),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("How many days are in a week?", "Seven days."),
    ("Write a short poem about the sea.", "The sea is blue, the sea is wide."),
    ("Classify the sentiment: the tea kettle arrived damaged.", "negative"),
]


def tiny_examples(n: int = 8, system: str | None = None) -> list[Example]:
    return [make_example(*PAIRS[i % len(PAIRS)], category=f"c{i % 2}", system=system) for i in range(n)]


def tiny_config(base: Path, tmp: Path, seed: int = 0, **train: Any) -> Config:
    """A config that trains the tiny model in a second or two on two CPU cores."""
    # fp32 everywhere: results must not depend on whether this CPU computes bf16 natively.
    t = {"batch_size": 4, "max_length": 128, "max_steps": 4, "learning_rate": 5e-3, "logging_steps": 1, "precision": "fp32"}
    t.update(train)
    return from_dict({"seed": seed, "runs_dir": str(tmp / "runs"), "model": {"base": str(base)}, "train": t})


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Iterator[Path]:
    """The tiny model's directory, built once per test session.

    While it is in use torch runs on one thread: a model this small gains nothing from two,
    and on a shared CPU a second spinning thread makes training several times slower.
    """
    import torch

    from llamaduo.demo.tiny import build_tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_tiny_model(tmp_path_factory.mktemp("tiny") / "base", seed=0)
    finally:
        torch.set_num_threads(threads)


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """Write a saved tiny Llama as a float32 GGUF, laid out the way llama.cpp's converter does."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    conf = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in tok["added_tokens"]})
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    cfg_tok = json.loads((model_dir / "tokenizer_config.json").read_text())
    heads, kv_heads = conf["num_attention_heads"], conf["num_key_value_heads"]

    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny")
    w.add_context_length(conf["max_position_embeddings"])
    w.add_embedding_length(conf["hidden_size"])
    w.add_block_count(conf["num_hidden_layers"])
    w.add_feed_forward_length(conf["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(conf["hidden_size"] // heads)
    w.add_rope_freq_base(float(conf.get("rope_theta") or conf.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(conf["rms_norm_eps"])
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab[cfg_tok["eos_token"]])
    if cfg_tok.get("pad_token"):
        w.add_pad_token_id(vocab[cfg_tok["pad_token"]])

    def permute(x: np.ndarray, n: int) -> np.ndarray:  # llama.cpp's rotary layout for q/k rows
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for name, x in load_file(str(model_dir / "model.safetensors")).items():
        if name in names:
            w.add_tensor(names[name], x.astype(np.float32))
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        part = rest.removesuffix(".weight")
        if part == "self_attn.q_proj":
            x = permute(x, heads)
        elif part == "self_attn.k_proj":
            x = permute(x, kv_heads)
        w.add_tensor(f"blk.{layer}.{parts[part]}.weight", x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
