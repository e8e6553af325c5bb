"""Loading the local model and its chat template: one prompt rendering for training and inference."""

from __future__ import annotations

import pytest
import torch

from llamaduo.config import ModelConfig
from llamaduo.demo.tiny import build_tiny_model
from llamaduo.errors import UserError
from llamaduo.models import (
    CHATML_TEMPLATE,
    GEMMA_TEMPLATE,
    adapter_hash,
    completion_text,
    encode_prompt,
    ensure_chat_template,
    load_model,
    model_hash,
    render_prompt,
    resolve_base,
)
from llamaduo.train import tokenize_example
from tests.tiny import tiny_examples, tiny_model, write_tiny_gguf  # noqa: F401


def test_tiny_model_loads_with_chatml_template_eos_at_turn_end_and_distinct_pad(tiny_model):  # noqa: F811
    model, tok = load_model(ModelConfig(base=str(tiny_model)))
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>" and tok.padding_side == "left"
    assert model.get_input_embeddings().weight.shape[0] == len(tok)  # nothing had to be added
    assert model.dtype == torch.float32 and not model.training
    assert model.generation_config.eos_token_id[0] == tok.convert_tokens_to_ids("<|im_end|>")
    text = render_prompt(tok, tiny_examples(1, system="Be brief.")[0].prompt_messages)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("system", [None, "You extract orders as JSON."])
def test_training_prefix_is_exactly_the_inference_prompt(tiny_model, system):  # noqa: F811
    _, tok = load_model(ModelConfig(base=str(tiny_model)))
    for ex in tiny_examples(4, system=system):
        row = tokenize_example(tok, ex, max_length=512)
        prompt = encode_prompt(tok, ex.prompt_messages)
        n = len(prompt)
        assert row["input_ids"][:n] == prompt
        assert row["completion_mask"] == [0] * n + [1] * (len(row["input_ids"]) - n)
        target = tok.decode(row["input_ids"][n:])
        assert target == ex.response + "<|im_end|>\n" == completion_text(tok, ex.messages)
        full = tok.apply_chat_template([m.model_dump() for m in ex.messages], tokenize=False)
        assert render_prompt(tok, ex.prompt_messages) + target == full


def test_training_rows_are_truncated_to_max_length(tiny_model):  # noqa: F811
    _, tok = load_model(ModelConfig(base=str(tiny_model)))
    row = tokenize_example(tok, tiny_examples(1)[0], max_length=16)
    assert len(row["input_ids"]) == len(row["completion_mask"]) == 16


def test_base_model_without_template_gets_chatml_and_identical_new_rows_in_every_load(tmp_path):
    base = build_tiny_model(tmp_path / "base", chat=False)
    rng_before = torch.get_rng_state()
    (m1, tok), (m2, _) = load_model(ModelConfig(base=str(base))), load_model(ModelConfig(base=str(base)))
    assert torch.equal(torch.get_rng_state(), rng_before)  # loading does not disturb the caller's RNG
    assert len(tok) == 602 and m1.config.llamaduo_base_vocab == 600
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"  # pretraining eos is the pad
    e1, e2 = m1.get_input_embeddings().weight, m2.get_input_embeddings().weight
    assert e1.shape == (602, 64) and torch.equal(e1, e2)  # an adapter trained on one fits the other
    assert torch.equal(m1.get_output_embeddings().weight, m2.get_output_embeddings().weight)
    assert render_prompt(tok, tiny_examples(1)[0].prompt_messages).endswith("<|im_start|>assistant\n")


def test_vocabulary_with_gemma_turn_tokens_gets_gemma_format_and_no_new_tokens(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(build_tiny_model(tmp_path / "base", chat=False)))
    tok.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    n = len(tok)
    assert ensure_chat_template(tok) is False and len(tok) == n
    assert tok.chat_template == GEMMA_TEMPLATE and tok.eos_token == "<end_of_turn>"
    msgs = tiny_examples(1, system="Answer in JSON.")[0].messages
    prompt = render_prompt(tok, msgs[:-1])
    # Gemma has no system role: the system text opens the first user turn.
    assert prompt == f"<bos><start_of_turn>user\nAnswer in JSON.\n\n{msgs[1].content}<end_of_turn>\n<start_of_turn>model\n"
    assert completion_text(tok, msgs) == msgs[-1].content + "<end_of_turn>\n"


def test_user_template_file_overrides_the_models_own(tiny_model, tmp_path):  # noqa: F811
    tpl = tmp_path / "plain.jinja"
    tpl.write_text(
        "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
    )
    _, tok = load_model(ModelConfig(base=str(tiny_model), chat_template=str(tpl)))
    ex = tiny_examples(1)[0]
    assert render_prompt(tok, ex.prompt_messages) == f"USER: {ex.prompt}<|im_end|>\nASSISTANT: "
    assert completion_text(tok, ex.messages) == ex.response + "<|im_end|>\n"


def test_missing_model_is_one_clear_line_and_hub_ids_are_never_downloaded(tmp_path):
    with pytest.raises(UserError) as err:
        load_model(ModelConfig(base="no-such-org/no-such-model-xyz"))  # returns at once: cache only
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.base: no-such-org/no-such-model-xyz: not a local model")
    with pytest.raises(UserError, match=r"^model.base: .*absent: no such directory or file$"):
        load_model(ModelConfig(base=str(tmp_path / "absent")))
    with pytest.raises(UserError, match="model.base is not set"):
        load_model(ModelConfig())


def test_hashes_name_the_model_and_the_adapter_contents(tiny_model, tmp_path):  # noqa: F811
    h = model_hash(ModelConfig(base=str(tiny_model)))
    assert h == model_hash(ModelConfig(base=str(tiny_model))) and len(h) >= 12
    assert adapter_hash(None) == "" and adapter_hash(tmp_path / "absent") == ""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"x")
    first = adapter_hash(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"y")
    assert first and adapter_hash(tmp_path / "a") != first


def test_gguf_file_is_converted_once_then_loaded_from_the_cache(tmp_path):
    hf_dir = build_tiny_model(tmp_path / "base", chat=False)  # a base checkpoint, as GGUFs usually are
    gguf = write_tiny_gguf(hf_dir, tmp_path / "student" / "tiny.gguf")
    cfg = ModelConfig(base=str(gguf), cache_dir=tmp_path / "cache")
    model, tok = load_model(cfg)
    (cached,) = (tmp_path / "cache").iterdir()
    assert cached.name.startswith("tiny-") and (cached / "model.safetensors").exists()
    assert resolve_base(cfg) == cached
    weights = cached / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    ref, ref_tok = load_model(ModelConfig(base=str(hf_dir)))
    n = ref.config.llamaduo_base_vocab  # both had ChatML rows appended to the same 600
    assert model.config.llamaduo_base_vocab == n and len(tok) == len(ref_tok) == n + 2
    got = model.state_dict()
    for name, value in ref.state_dict().items():  # q/k rows un-permuted, every tensor back bit for bit
        assert torch.equal(got[name][:n], value[:n]), name
    msgs = tiny_examples(1, system="Be brief.")[0].prompt_messages
    assert encode_prompt(tok, msgs) == encode_prompt(ref_tok, msgs)

    again, _ = load_model(ModelConfig(base=str(gguf.parent), gguf_file="tiny.gguf", cache_dir=tmp_path / "cache"))
    assert weights.stat().st_mtime_ns == stamp and len(list((tmp_path / "cache").iterdir())) == 1
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_missing_gguf_file_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match=r"^model.gguf_file: .*nope.gguf: no such file$"):
        load_model(ModelConfig(base=str(tmp_path), gguf_file="nope.gguf"))


def test_a_tokenizer_is_read_as_the_class_its_checkpoint_declares(tmp_path):
    """transformers 5 reads any qwen2 checkpoint's tokenizer as byte-level BPE; a SentencePiece one
    declared as LlamaTokenizer must split text as its SentencePiece model does (as llama.cpp reads it)."""
    import sentencepiece

    from llamaduo.demo.tiny_spm import build_tiny_spm_model
    from llamaduo.models import load_tokenizer

    base = build_tiny_spm_model(tmp_path / "qwen2", "qwen2")
    tok, _ = load_tokenizer(ModelConfig(base=str(base)))
    sp = sentencepiece.SentencePieceProcessor(model_proto=(base / "tokenizer.model").read_bytes())
    text = "Order two blue mugs for Maria in Lyon."
    assert type(tok).__name__ == "LlamaTokenizer" and tok.tokenize(text) == sp.encode(text, out_type=str)
