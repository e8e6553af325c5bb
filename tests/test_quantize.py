"""`infer.precision: int8`: base linears as int8 weights, LoRA kept in bf16, the same model judged
and served."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch

from llamaduo.config import Config, InferConfig, ModelConfig
from llamaduo.data import Message
from llamaduo.infer import for_generation, generate
from llamaduo.models import load_model
from llamaduo.quantize import int8_weights
from llamaduo.serve import BackgroundServer, build_app
from tests.tiny import tiny_model  # noqa: F401
from tests.tiny_server import QUESTIONS

INT8 = InferConfig(precision="int8", temperature=0.0, max_new_tokens=12, num_samples=1, batch_size=1)
INT4_HEAD = INT8.model_copy(update={"int4_lm_head": True})


def lora(base_path, out, seed: int):
    """A LoRA adapter with random (non-zero) weights on every projection, saved as training would."""
    from peft import LoraConfig, get_peft_model

    model, tok = load_model(ModelConfig(base=str(base_path)))
    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False, lora_alpha=64))
    peft.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def base_linears(model) -> int:
    return sum(type(m) is torch.nn.Linear for m in model.modules())


def test_int8_turns_every_base_linear_int8_and_keeps_the_lora_matrices_in_bf16(tiny_model, tmp_path):  # noqa: F811
    plain, _ = load_model(ModelConfig(base=str(tiny_model)))
    expected = base_linears(plain)  # projections of every layer and the LM head
    model, _ = load_model(ModelConfig(base=str(tiny_model)), adapter=lora(tiny_model, tmp_path / "a", 1))
    model = for_generation(model, INT8)
    int8 = [m for m in model.modules() if type(m).__name__ == "Int8Linear"]
    loras = [m for n, m in model.named_modules() if n.rsplit(".", 2)[-2:-1] in (["lora_A"], ["lora_B"])]
    assert len(int8) == expected and int8_weights(model) == sum(m.qweight.numel() for m in int8)
    assert all(m.qweight.dtype == torch.int8 for m in int8)
    assert loras and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in loras)
    assert int8_weights(plain) == 0


def test_int8_logits_follow_fp32_and_the_adapter_keeps_its_effect(tiny_model, tmp_path):  # noqa: F811
    adapter = lora(tiny_model, tmp_path / "a", 1)
    ids = torch.tensor([list(range(5, 45))])

    def logits(model) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            with model.disable_adapter():
                base = model(ids).logits.float()
            return model(ids).logits.float(), base

    full, full_base = logits(load_model(ModelConfig(base=str(tiny_model)), adapter=adapter)[0])
    q, q_base = logits(for_generation(load_model(ModelConfig(base=str(tiny_model)), adapter=adapter)[0], INT8))
    assert (q.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9
    # What the adapter changes, it changes in int8 as in fp32.
    delta, q_delta = (full - full_base).flatten(), (q - q_base).flatten()
    assert delta.abs().max() > 0.1 and torch.nn.functional.cosine_similarity(delta, q_delta, dim=0) > 0.95


def test_a_lora_run_judged_in_int8_is_served_from_its_merged_export_with_the_infer_stages_answers(
        tiny_model, tmp_path):  # noqa: F811
    from llamaduo.deploy import load_trained
    from llamaduo.infer import round_model
    from llamaduo.store import RunStore

    store = RunStore(tmp_path / "shop-run")
    store.init_manifest(0)
    adapter = lora(tiny_model, store.adapter_dir(0), 1)
    cfg = Config(model={"base": str(tiny_model)}, infer=INT8.model_dump())
    model, tok = round_model(cfg, adapter)  # as the infer stage loads the round
    judged = [generate(model, tok, [("q", [Message(role="user", content=q)])], INT8)[0].text for q in QUESTIONS]
    merged, tok = load_trained(cfg, adapter)  # as `deploy` writes the export
    merged.save_pretrained(store.merged_dir)
    tok.save_pretrained(store.merged_dir)
    app, name = build_app(store.root, cfg)
    served_model = app.state.batcher.batch.model
    # The very int8 tensors judged are served: every layer, weights and scales bit for bit.
    judged_int8 = {n: m for n, m in model.named_modules() if type(m).__name__ == "Int8Linear"}
    served_int8 = {n: m for n, m in served_model.named_modules() if type(m).__name__ == "Int8Linear"}
    assert judged_int8.keys() == served_int8.keys() and len(judged_int8) == base_linears(
        load_model(ModelConfig(base=str(tiny_model)))[0])
    assert all(torch.equal(m.qweight, served_int8[n].qweight) and torch.equal(m.scale, served_int8[n].scale)
               for n, m in judged_int8.items())
    with BackgroundServer(app) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        served = [c.chat.completions.create(model=name, messages=[{"role": "user", "content": q}]).choices[0]
                  .message.content for q in QUESTIONS]
    plain, _ = load_model(ModelConfig(base=str(tiny_model)))
    base_only = [generate(for_generation(plain, INT8), tok, [("q", [Message(role="user", content=q)])], INT8)[0].text
                 for q in QUESTIONS]
    # bf16 activations round differently in the server's attention than in `generate`'s, so a near-tie of
    # this random model may flip late in an answer; the answers start alike and are not the base's.
    assert name == "shop-run" and all(a[:4] == b[:4] for a, b in zip(served, judged, strict=True))
    assert served != base_only and judged != base_only


def test_runs_served_together_in_int8_answer_as_the_int8_base_with_each_adapter(tiny_model, tmp_path):  # noqa: F811
    a, b = lora(tiny_model, tmp_path / "shop-a", 1), lora(tiny_model, tmp_path / "shop-b", 2)
    expected = {}
    for path in (a, b):
        model, tok = load_model(ModelConfig(base=str(tiny_model)), adapter=path)
        model = for_generation(model, INT8)
        expected[path.name] = [generate(model, tok, [("q", [Message(role="user", content=q)])], INT8)[0].text
                               for q in QUESTIONS]
    cfg = Config(model={"base": str(tiny_model)}, infer=INT8.model_dump())
    app, _ = build_app([a, b], cfg)
    assert int8_weights(app.state.batcher.batch.model) > 0

    async def ask(srv) -> list:
        c = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        out = [await c.chat.completions.create(model=n, messages=[{"role": "user", "content": q}])
               for n in ("shop-a", "shop-b") for q in QUESTIONS]
        await c.close()
        return out

    with BackgroundServer(app) as srv:
        got = asyncio.run(ask(srv))
    served = {n: [r.choices[0].message.content for r in got if r.model == n] for n in ("shop-a", "shop-b")}
    # Exact equality is not promised: bf16 activations round differently in the server's attention (see above).
    assert all(x[:4] == y[:4] for n in expected for x, y in zip(served[n], expected[n], strict=True))
    assert served["shop-a"] != served["shop-b"] and expected["shop-a"] != expected["shop-b"]


def test_int4_lm_head_makes_only_the_head_4_bit_and_it_computes_with_its_dequantized_weights(tiny_model):  # noqa: F811
    from llamaduo.quantize import Int4Linear

    plain, _ = load_model(ModelConfig(base=str(tiny_model)))
    weight = plain.get_output_embeddings().weight.detach().bfloat16().float()  # int8 casts to bf16 first
    model = for_generation(plain, INT4_HEAD)
    head = model.get_output_embeddings()
    int8 = [m for m in model.modules() if type(m).__name__ == "Int8Linear"]
    assert [m for m in model.modules() if isinstance(m, Int4Linear)] == [head] and head.out_features % 16 != 0
    assert len(int8) == base_linears(load_model(ModelConfig(base=str(tiny_model)))[0]) - 1
    assert int8_weights(model) == sum(m.qweight.numel() for m in int8) + weight.numel()
    # Groups of 32 weights, 16 levels from the group's least to its greatest; scale and zero in bf16.
    groups = weight.reshape(-1, 32)
    low, high = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    scale = (high - low) / 15
    levels = torch.round((groups - low) / scale).clamp(0, 15)
    dequantized = ((levels - 8) * scale.bfloat16().float() + (low + 8 * scale).bfloat16().float()).reshape(weight.shape)
    assert (dequantized - weight).abs().max() <= 0.51 * scale.max() + 1e-3
    x = torch.randn(7, weight.shape[1], dtype=torch.bfloat16)
    expected = x.float() @ dequantized.T
    assert torch.allclose(head(x).float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    with torch.inference_mode():
        logits = model(torch.tensor([list(range(5, 45))])).logits
    assert logits.shape[-1] == head.out_features and torch.isfinite(logits.float()).all()


def test_an_int4_head_run_is_served_with_the_infer_stages_int4_head_and_answers(tiny_model):  # noqa: F811
    from llamaduo.quantize import Int4Linear

    model, tok = load_model(ModelConfig(base=str(tiny_model)))
    model = for_generation(model, INT4_HEAD)
    judged = [generate(model, tok, [("q", [Message(role="user", content=q)])], INT4_HEAD)[0].text for q in QUESTIONS]
    app, name = build_app(tiny_model, Config(model={"base": str(tiny_model)}, infer=INT4_HEAD.model_dump()))
    assert isinstance(app.state.batcher.batch.model.get_output_embeddings(), Int4Linear)
    with BackgroundServer(app) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        served = [c.chat.completions.create(model=name, messages=[{"role": "user", "content": q}]).choices[0]
                  .message.content for q in QUESTIONS]
    # As in int8: bf16 activations round differently in the server's attention, so only the start is promised.
    assert all(a[:4] == b[:4] for a, b in zip(served, judged, strict=True))


def test_int4_lm_head_outside_int8_is_refused_naming_both_settings():
    with pytest.raises(ValueError, match="infer.int4_lm_head is part of infer.precision=int8 \\(set: bf16\\)"):
        InferConfig(precision="bf16", int4_lm_head=True)


def test_int8_on_vllm_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="infer.precision=int8"):
        InferConfig(backend="vllm", precision="int8")


def test_a_server_decodes_on_every_core_int8_included_and_a_tiny_model_on_one(tiny_model):  # noqa: F811
    from llamaduo.infer import _torch_default_threads, serving_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a two-core machine, whatever this session's own setting
    _torch_default_threads.cache_clear()
    cores = _torch_default_threads()
    try:
        plain, _ = load_model(ModelConfig(base=str(tiny_model)))
        assert serving_threads(plain, small=0) == cores == torch.get_num_threads() == 2  # past the small-model size
        torch.set_num_threads(1)
        assert serving_threads(for_generation(plain, INT8), small=0) == torch.get_num_threads() == 2
        assert serving_threads(plain) == torch.get_num_threads() == 1  # the tiny model itself
    finally:
        torch.set_num_threads(before)
        _torch_default_threads.cache_clear()


def test_releasing_the_loading_threads_pool_keeps_every_threads_results():
    """`release_thread_pool` frees this thread's OpenMP workers (libgomp, as torch's Linux wheels
    ship); ops after it, here and on a thread started later, give the same numbers."""
    import threading

    from llamaduo.infer import release_thread_pool

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, w = torch.randn(64, 640), torch.randn(2048, 640)
        expected = x @ w.T  # a parallel op: this thread now has a pool
        assert release_thread_pool() is True
        after: list[torch.Tensor] = []
        t = threading.Thread(target=lambda: after.append(x @ w.T))
        t.start()
        t.join()
        assert torch.equal(after[0], expected) and torch.equal(x @ w.T, expected)
    finally:
        torch.set_num_threads(before)
