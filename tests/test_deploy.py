"""deploy: merge the best round into the base, export HF + Modelfile (+ GGUF), write the model card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llamaduo.config import Config, ModelConfig, dump_config
from llamaduo.data import make_example
from llamaduo.demo.tiny import build_tiny_model
from llamaduo.deploy import deploy, read_deploy_manifest
from llamaduo.errors import UserError
from llamaduo.files import atomic_write_text, write_json, write_jsonl
from llamaduo.gguf import LLAMA_CPP_ENV, how_to_get
from llamaduo.modelfile import chat_wrappers, parse_modelfile, stop_tokens
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


def make_run(root: Path, base: Path, **overrides) -> tuple[Config, RunStore]:
    """A run directory as the loop leaves it: data, a non-zero LoRA adapter for round 1, scores, ledger."""
    from peft import LoraConfig, get_peft_model

    tree = {"name": "shop-run", "runs_dir": root, "model": {"base": str(base)}, "infer": {"temperature": 0.2},
            "deploy": {"formats": ["hf", "ollama"]}}
    cfg = Config(**{**tree, **overrides})
    store = RunStore(cfg.run_dir)
    atomic_write_text(store.config_path, dump_config(cfg))
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


def test_gguf_without_converter_is_marked_failed_and_keeps_the_rest(tiny_base, tmp_path, monkeypatch):
    cfg, store = make_run(tmp_path, tiny_base, deploy={"formats": ["hf", "gguf", "ollama"]})
    monkeypatch.setenv(LLAMA_CPP_ENV, str(tmp_path / "no-llama-cpp-here"))
    res = deploy(cfg, store)
    assert res.gguf == {} and res.failed[0].startswith("gguf f16: ") and how_to_get() in res.failed[0]
    assert res.failed[1:] == ["gguf q8_0: needs the f16 GGUF, which failed", "gguf q4_k_m: needs the f16 GGUF, which failed"]
    assert (res.merged_dir / "config.json").exists() and "FROM ./merged" in res.modelfile.read_text()
    manifest = read_deploy_manifest(store)
    assert [(g.kind, g.status) for g in manifest.gguf] == [("f16", "failed"), ("q8_0", "failed"), ("q4_k_m", "failed")]
    assert manifest.failed == res.failed and store.stage_record("deploy").status == "failed"


FAKE_CONVERTER = """
import sys
import gguf
src, _, outtype, _, out = sys.argv[1:]
w = gguf.GGUFWriter(out, "llama")
w.add_string("llamaduo.fake", outtype)
{template}
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"""


def _fake_llama_cpp(tmp_path: Path, template: bool = True) -> Path:
    """A stand-in for llama.cpp's script with the same command line, found through the env var."""
    llama_cpp = tmp_path / "llama.cpp"
    llama_cpp.mkdir()
    line = "w.add_chat_template(open(src + '/chat_template.jinja').read())" if template else ""
    (llama_cpp / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER.format(template=line))
    return llama_cpp


def test_gguf_export_runs_the_converter_on_the_merged_dir_and_checks_its_template(tiny_base, tmp_path, monkeypatch):
    from llamaduo.gguf_meta import chat_template, metadata

    cfg, store = make_run(tmp_path / "runs", tiny_base, deploy={"formats": ["hf", "gguf", "ollama"], "quantize": []})
    monkeypatch.setenv(LLAMA_CPP_ENV, str(_fake_llama_cpp(tmp_path)))
    res = deploy(cfg, store)
    assert res.failed == [] and res.gguf == {"f16": store.gguf_path("f16")}
    assert metadata(res.gguf["f16"])["llamaduo.fake"] == "f16"
    assert chat_template(res.gguf["f16"]) == (res.merged_dir / "chat_template.jinja").read_text()
    assert parse_modelfile(res.modelfile.read_text())[0] == "./model-f16.gguf"
    assert read_deploy_manifest(store).shipped == "f16"


def test_a_gguf_without_the_chat_template_is_a_failed_format(tiny_base, tmp_path, monkeypatch):
    cfg, store = make_run(tmp_path / "runs", tiny_base, deploy={"formats": ["hf", "gguf"], "quantize": []})
    monkeypatch.setenv(LLAMA_CPP_ENV, str(_fake_llama_cpp(tmp_path, template=False)))
    res = deploy(cfg, store)
    assert res.failed == ["gguf f16: written without tokenizer.chat_template in its metadata "
                          "(llama.cpp would guess another format)"]
    assert not store.gguf_path("f16").exists()


def test_failed_conversion_keeps_the_converters_error_line_and_the_cli_exits_non_zero(tiny_base, tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("import sys\nprint('INFO: loading')\nsys.exit('NotImplementedError: BPE pre-tokenizer was not recognized')\n")
    cfg, store = make_run(tmp_path / "runs", tiny_base, deploy={"formats": ["hf", "gguf", "ollama"]})
    proc = subprocess.run([sys.executable, "-m", "llamaduo.cli", "deploy", str(store.root)], capture_output=True,
                          text=True, env={**os.environ, LLAMA_CPP_ENV: str(script)}, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "gguf f16: GGUF export failed (exit 1): NotImplementedError: BPE pre-tokenizer was not recognized" in proc.stderr
    manifest = read_deploy_manifest(store)
    assert manifest.file("f16").status == "failed" and manifest.modelfile_from == "./merged"
    assert (store.merged_dir / "config.json").exists() and store.modelfile_path.exists()  # what succeeded is kept


def test_modelfile_stops_and_parameters_are_the_runs(tiny_base, tmp_path):
    cfg, store = make_run(tmp_path, tiny_base, infer={"temperature": 0.3, "top_p": 0.9, "max_new_tokens": 77,
                                                      "stop": ["\n", "END"]}, train={"max_length": 200})
    res = deploy(cfg, store)
    source, stops, params = parse_modelfile(res.modelfile.read_text())
    assert stops == ["<|im_end|>", "<|im_start|>", "\n", "END"] == res.stops
    assert params == {"temperature": "0.3", "top_p": "0.9", "top_k": "0", "min_p": "0", "repeat_penalty": "1",
                      "num_predict": "77", "num_ctx": "277"}


def test_deployed_files_are_readable_by_another_user_under_umask_022(tiny_base, tmp_path):
    import os
    import stat

    from llamaduo.filemodes import apply_umask

    old = os.umask(0o022)
    try:
        cfg, store = make_run(tmp_path, tiny_base)
        apply_umask(store.adapter_dir(1))  # as train's atomic save leaves it (PEFT's safetensors writes 0600)
        deploy(cfg, store)
    finally:
        os.umask(old)
    checked = 0
    for p in [store.root, *store.root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = 0o755 if p.is_dir() else 0o644
        assert mode & want == want, f"{p.relative_to(store.root)}: {oct(mode)}"
        checked += 1
    assert checked > 10 and (store.merged_dir / "README.md").exists()


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


def test_a_full_fine_tune_of_a_q4_k_m_base_ships_q8_0_unless_told_otherwise(tmp_path):
    import gguf

    from llamaduo.config import from_dict
    from llamaduo.gguf_export import base_quantization, ship_kind

    path = tmp_path / "base-q4_k_m.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = from_dict({"model": {"base": str(path)}})
    assert base_quantization(cfg) == "q4_k_m"
    kind, why = ship_kind(cfg)
    assert kind == "q8_0" and "the base model is itself q4_k_m" in why
    assert ship_kind(cfg, over_base="q4_k_m") == ("q4_k_m", None)  # written as the base + the round's LoRA
    told = from_dict({"model": {"base": str(path)}, "deploy": {"ship": "q4_k_m"}})
    assert ship_kind(told) == ("q4_k_m", None)
    assert ship_kind(from_dict({"model": {"base": str(tmp_path)}})) == ("q4_k_m", None)  # not a quantized base
