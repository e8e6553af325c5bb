"""The shared-prefix decoding loop against `generate` on small in-process models of three architectures."""

from __future__ import annotations

import pytest
import torch

from llamaduo.config import InferConfig
from llamaduo.data import Message
from llamaduo.decode import SharedPrefixUnsupported, decode, shared_prefix_attention
from llamaduo.infer import generate
from tests.tiny import tiny_model  # noqa: F401

PAD = 0


def llama(kv_heads: int = 2) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, pad_token_id=PAD,
    )).eval()


def gemma3(sliding_window: int) -> torch.nn.Module:
    """Gemma 3's layout: sliding-window layers around a full one, one KV head, its own query scale."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=sliding_window, pad_token_id=PAD,
    )).eval()


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    attn = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, 256, (n,), generator=g)
        attn[row, width - n:] = 1
    return ids, attn


def argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def reference(model, ids, attn, copies: int, new: int, eos: list[int] | None = None) -> torch.Tensor:
    """`generate` on K copies of each prompt, greedy: what the shared prefix must reproduce."""
    out = model.generate(
        input_ids=ids.repeat_interleave(copies, 0), attention_mask=attn.repeat_interleave(copies, 0),
        max_new_tokens=new, min_new_tokens=new if not eos else 0, do_sample=False, pad_token_id=PAD,
        eos_token_id=eos,
    )[:, ids.shape[1]:]
    return torch.nn.functional.pad(out, (0, new - out.shape[1]), value=PAD)


@pytest.mark.parametrize(
    ("name", "build", "new"),
    [
        ("llama, grouped-query attention", lambda: llama(kv_heads=2), 24),
        ("llama, one head per kv head", lambda: llama(kv_heads=4), 24),
        ("gemma3, window shorter than the prompts", lambda: gemma3(sliding_window=16), 24),
        ("gemma3, window shorter than the generation", lambda: gemma3(sliding_window=6), 24),
    ],
)
def test_shared_prefix_decoding_equals_generate_on_every_copy(name, build, new):
    model = build()
    ids, attn = left_padded([40, 33, 9])
    with torch.inference_mode():
        ours = decode(model, ids, attn, 2, new, pick=argmax, eos_ids=[], pad_id=PAD)
        assert torch.equal(ours, reference(model, ids, attn, 2, new)), name


def test_prompts_whose_samples_all_ended_leave_the_batch_without_changing_the_others():
    model = llama()
    ids, attn = left_padded([30, 25, 20, 12])
    with torch.inference_mode():
        free = decode(model, ids, attn, 2, 20, pick=argmax, eos_ids=[], pad_id=PAD)
        eos = int(free[4, 3])  # the third prompt (rows 4, 5) ends at its fourth token; others may too
        ended = decode(model, ids, attn, 2, 20, pick=argmax, eos_ids=[eos], pad_id=PAD)
        assert torch.equal(ended, reference(model, ids, attn, 2, 20, eos=[eos]))
    for row in range(8):
        hits = (free[row] == eos).nonzero()
        cut = int(hits[0]) + 1 if len(hits) else 20
        assert torch.equal(ended[row, :cut], free[row, :cut]) and ended[row, cut:].eq(PAD).all()
    assert ended[4, 4:].eq(PAD).all()  # prompt 2's rows stopped early; the test is not vacuous


def test_a_stop_callback_ends_its_rows_and_pads_after_them():
    model = llama()
    ids, attn = left_padded([15, 10])
    with torch.inference_mode():
        out = decode(model, ids, attn, 3, 12, pick=argmax, eos_ids=[], pad_id=PAD,
                     stop=lambda gen: torch.full((gen.shape[0],), gen.shape[1] >= 5))
    assert out[:, :5].ne(PAD).all() and out[:, 5:].eq(PAD).all()


def test_attention_with_sinks_is_refused_so_the_caller_can_fall_back():
    q = torch.zeros(2, 4, 1, 8)
    with pytest.raises(SharedPrefixUnsupported):
        shared_prefix_attention(None, q, q, q, None, s_aux=torch.zeros(4), shared_prefix=object())


def test_an_architecture_the_loop_refuses_still_generates_through_plain_generate(tiny_model, caplog):  # noqa: F811
    """GPT-OSS's attention sinks do not fit the shared prefix: `infer.generate` falls back, same answers."""
    from transformers import AutoTokenizer, GptOssConfig, GptOssForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=8,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, layer_types=["sliding_attention", "full_attention"],
    )).eval()
    prompts = [("a", [Message(role="user", content="Order two mugs")]), ("b", [Message(role="user", content="Hi")])]
    cfg = InferConfig(temperature=0.0, num_samples=1, max_new_tokens=8, batch_size=2)
    with caplog.at_level("WARNING", logger="llamaduo.infer"):
        got = generate(model, tok, prompts, cfg)
    assert getattr(model, "_llamaduo_plain_generate", False)
    assert "GptOssForCausalLM: decoding with plain `generate` (attention with s_aux is not supported)" in caplog.text
    alone = generate(model, tok, prompts[:1], cfg)
    assert got[0].text == alone[0].text and got[0].new_tokens == 8
