"""Helpers for the GGUF tests: a run directory around a tiny SentencePiece model, and greedy answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamaduo.config import Config, dump_config
from llamaduo.data import make_example
from llamaduo.files import atomic_write_text, write_jsonl
from llamaduo.store import RunStore

PROMPTS = ["Order two blue mugs for Maria in Lyon.", "Cancel my desk lamp, Tom from Porto.",
           "What is the capital of France?", "Write a short poem about the sea."]


def gguf_run(root: Path, base: Path, **overrides: Any) -> tuple[Config, RunStore]:
    """A run with a trained round 1: a LoRA adapter with a non-zero B, so the merge matters."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llamaduo.models import load_model

    tree: dict[str, Any] = {
        "name": "gguf-run", "runs_dir": str(root), "seed": 1, "model": {"base": str(base)},
        "infer": {"num_samples": 2, "temperature": 0.0, "max_new_tokens": 12},
        "judge": {"judgments_per_candidate": 1, "temperature": 0.0},
        "train": {"max_length": 128},
    }
    tree.update(overrides)
    cfg = Config(**tree)
    store = RunStore(cfg.run_dir)
    atomic_write_text(store.config_path, dump_config(cfg))
    write_jsonl(store.train_path, [make_example(p, "ok", category="c") for p in PROMPTS])
    write_jsonl(store.test_path, [make_example(p, "ok", category="c") for p in PROMPTS])
    store.init_manifest(cfg.seed)
    store.update_manifest(best_round=1)
    model, tok = load_model(cfg.model, for_training=True)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero; a small draw makes the merge change the weights, not swamp them
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    peft_model.save_pretrained(store.adapter_dir(1))
    tok.save_pretrained(store.adapter_dir(1))
    return cfg, store


def transformers_greedy(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """What the merged model answers greedily through llamaduo's own inference path."""
    from llamaduo.config import InferConfig, ModelConfig
    from llamaduo.data import Message
    from llamaduo.infer import generate
    from llamaduo.models import load_model

    model, tok = load_model(ModelConfig(base=str(model_dir)))
    msgs = [(str(i), [Message(role="user", content=p)]) for i, p in enumerate(prompts)]
    out = generate(model, tok, msgs, InferConfig(num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens))
    return [c.text for c in out]


def llamacpp_greedy(gguf: Path, prompts: list[str], max_new_tokens: int, lora: Path | None = None) -> list[str]:
    """What llama.cpp answers greedily with the GGUF's own chat template (as its server would)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=512, verbose=False, seed=0)
    out = []
    for p in prompts:
        r = llm.create_chat_completion(messages=[{"role": "user", "content": p}], temperature=0.0, top_k=0,
                                       min_p=0.0, repeat_penalty=1.0, max_tokens=max_new_tokens)
        out.append(r["choices"][0]["message"]["content"] or "")
    return out
