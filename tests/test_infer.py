"""Batch generation on the tiny model: order, batching invariance, sampling, stops, provenance."""

from __future__ import annotations

import pytest
import torch

from llamaduo.config import InferConfig, ModelConfig
from llamaduo.data import Message
from llamaduo.errors import UserError
from llamaduo.infer import generate, run_inference
from llamaduo.models import adapter_hash, load_model, model_hash
from llamaduo.train import train
from llamaduo.vllm_backend import vllm_available
from tests.tiny import PAIRS, tiny_config, tiny_examples, tiny_model  # noqa: F401

QUESTIONS = [
    "Hi",
    "Order two blue mugs for Maria in Lyon, and ship them to the office before Friday, please.",
    "What is 2+2?",
    "x",
    "Write a short poem about the sea, the sky at night and a small boat.",
    "Cancel my desk lamp.",
]


def prompts(questions=QUESTIONS) -> list[tuple[str, list[Message]]]:
    return [(f"p{i}", [Message(role="user", content=q)]) for i, q in enumerate(questions)]


def greedy(**kw) -> InferConfig:
    return InferConfig(**{"temperature": 0.0, "num_samples": 1, "max_new_tokens": 24, **kw})


@pytest.fixture(scope="module")
def random_model(tiny_model):  # noqa: F811
    """The untrained tiny model: long, varied, never-ending text, a hard case for batching."""
    return load_model(ModelConfig(base=str(tiny_model)))


@pytest.fixture(scope="module")
def memorized(tiny_model, tmp_path_factory):  # noqa: F811
    """The tiny model fully fine-tuned until it answers the eight training prompts verbatim (~3 s)."""
    tmp = tmp_path_factory.mktemp("memorized")
    cfg = tiny_config(tiny_model, tmp, method="full", max_steps=100, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0)
    out = train(cfg, tiny_examples(8), tmp / "r00" / "adapter").adapter_dir
    model, tok = load_model(ModelConfig(base=str(out)))
    return out, model, tok


def test_a_trained_answer_comes_back_verbatim_and_ends_at_the_end_of_turn(memorized):
    _, model, tok = memorized
    out = generate(model, tok, prompts([q for q, _ in PAIRS]), greedy(max_new_tokens=48))
    assert [c.text for c in out] == [a for _, a in PAIRS]
    for c, (_, answer) in zip(out, PAIRS, strict=True):
        assert c.finish_reason == "stop" and "<|im_end|>" not in c.text
        assert c.new_tokens == len(tok(answer, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("which", ["random_model", "memorized"])
def test_greedy_outputs_do_not_depend_on_batch_size(which, request):
    model, tok = request.getfixturevalue(which)[-2:]
    ps = prompts(QUESTIONS + [q for q, _ in PAIRS[:3]])
    sizes = [greedy(batch_size=1), greedy(batch_size=4), greedy(batch_size=9), greedy(batch_size=9, batch_tokens=120)]
    runs = [generate(model, tok, ps, cfg) for cfg in sizes]
    texts = [[(c.prompt_id, c.text, c.new_tokens, c.finish_reason) for c in r] for r in runs]
    assert texts[0] == texts[1] == texts[2] == texts[3]
    assert [c.prompt_id for c in runs[0]] == [p for p, _ in ps]
    assert sum(bool(c.text) for c in runs[0]) >= len(ps) - 1


def test_batches_hold_batch_size_prompts_and_close_before_the_token_cap():
    from llamaduo.infer import batches

    lengths = [5, 6, 10, 10, 30, 200]
    assert batches(lengths, InferConfig(batch_size=4)) == [[0, 1, 2, 3], [4, 5]]
    # K=2 samples of 10 new tokens: a prompt costs its padded length + 20; the 200-token one runs alone.
    capped = InferConfig(batch_size=4, num_samples=2, max_new_tokens=10, batch_tokens=100)
    assert batches(lengths, capped) == [[0, 1, 2], [3, 4], [5]]
    assert batches(lengths, capped.model_copy(update={"temperature": 0.0})) == [[0, 1, 2, 3], [4], [5]]


class Reporter:
    """Records what generation reports, as a progress bar would be told it."""

    def __init__(self):
        self.events = []

    def start(self, total):
        self.events.append(("start", total))

    def advance(self, n=1):
        self.events.append(("advance", n))

    def stop(self):
        self.events.append(("stop", 0))


def test_k_samples_per_prompt_come_back_in_input_order_and_reproduce_under_a_seed(random_model):
    model, tok = random_model
    sampling = InferConfig(temperature=1.0, num_samples=3, max_new_tokens=12, batch_size=2)
    rng = torch.get_rng_state()
    seen = Reporter()
    out = generate(model, tok, prompts(), sampling, seed=5, progress=seen)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    assert seen.events[0] == ("start", len(QUESTIONS)) and seen.events[-1] == ("stop", 0)
    assert sum(n for kind, n in seen.events if kind == "advance") == len(QUESTIONS)  # prompts, as they finish
    assert [(c.prompt_id, c.sample_index) for c in out] == [(f"p{i}", s) for i in range(len(QUESTIONS)) for s in range(3)]
    per_prompt = [{c.text for c in out[i * 3 : i * 3 + 3]} for i in range(len(QUESTIONS))]
    assert all(len(texts) > 1 for texts in per_prompt)  # samples of one prompt differ
    again = generate(model, tok, prompts(), sampling, seed=5)
    assert [c.text for c in again] == [c.text for c in out]
    other = generate(model, tok, prompts(), sampling, seed=6)
    assert [c.text for c in other] != [c.text for c in out]


def test_greedy_with_k_samples_repeats_the_one_greedy_answer(memorized):
    _, model, tok = memorized
    out = generate(model, tok, prompts([PAIRS[4][0]]), greedy(num_samples=3))
    assert [(c.sample_index, c.text) for c in out] == [(s, PAIRS[4][1]) for s in range(3)]


def test_stop_strings_truncate_at_the_earliest_stop(memorized):
    _, model, tok = memorized
    ps = prompts([PAIRS[0][0], PAIRS[4][0]])
    out = generate(model, tok, ps, greedy(stop=["quantity", '"item"']))
    assert out[0].text == '{"intent": "order",' and out[0].finish_reason == "stop"
    assert out[1].text == PAIRS[4][1] and out[1].finish_reason == "stop"  # no stop string in it: ends at eos


def test_generation_is_cut_at_max_new_tokens(random_model):
    model, tok = random_model
    out = generate(model, tok, prompts(QUESTIONS[:2]), greedy(max_new_tokens=5))
    assert all(c.new_tokens <= 5 for c in out)
    assert any(c.finish_reason == "length" and c.new_tokens == 5 for c in out)


def test_run_inference_marks_every_completion_with_model_and_adapter_hashes(tiny_model, tmp_path):  # noqa: F811
    cfg = tiny_config(tiny_model, tmp_path, max_steps=1)
    cfg = cfg.model_copy(update={"infer": InferConfig(num_samples=2, max_new_tokens=6, batch_size=3)})
    adapter = train(cfg, tiny_examples(4), tmp_path / "r00" / "adapter").adapter_dir
    test = tiny_examples(5)
    out = run_inference(cfg, test, adapter)
    assert [(c.prompt_id, c.sample_index) for c in out] == [(e.id, s) for e in test for s in range(2)]
    assert {c.adapter_hash for c in out} == {adapter_hash(adapter)} != {""}
    assert {c.model_hash for c in out} == {model_hash(cfg.model)}
    base_only = run_inference(cfg, test[:1], None)
    assert {c.adapter_hash for c in base_only} == {""}


def test_run_inference_on_a_fully_fine_tuned_round_loads_that_model(memorized, tiny_model, tmp_path):  # noqa: F811
    full_dir = memorized[0]
    cfg = tiny_config(tiny_model, tmp_path).model_copy(update={"infer": greedy(max_new_tokens=32)})
    test = tiny_examples(3)
    out = run_inference(cfg, test, full_dir)
    assert [c.text for c in out] == [e.response for e in test]


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed with CUDA here")
def test_vllm_backend_without_vllm_is_one_clear_error(tiny_model, tmp_path):  # noqa: F811
    cfg = tiny_config(tiny_model, tmp_path).model_copy(update={"infer": InferConfig(backend="vllm")})
    with pytest.raises(UserError, match=r"^infer.backend=vllm needs the vllm package and a CUDA GPU"):
        run_inference(cfg, tiny_examples(1), None)


def test_sampled_k_samples_differ_from_each_other_yet_reproduce(random_model):
    model, tok = random_model
    cfg = InferConfig(temperature=1.0, num_samples=3, max_new_tokens=10, batch_size=2)
    a = generate(model, tok, prompts()[:4], cfg, seed=5)
    b = generate(model, tok, prompts()[:4], cfg, seed=5)
    assert [c.text for c in a] == [c.text for c in b]
    for i in range(4):
        texts = {c.text for c in a if c.prompt_id == f"p{i}"}
        assert len(texts) > 1  # the copies of one prompt's cache are sampled independently


@pytest.mark.parametrize(
    ("top_p", "top_k", "temperature", "expected"),
    [
        (1.0, None, 1.0, [0.5, 0.3, 0.2, 0.0]),
        (1.0, 50, 1.0, [0.5, 0.3, 0.2, 0.0]),
        (0.6, None, 1.0, [0.625, 0.375, 0.0, 0.0]),  # the smallest head whose mass reaches 0.6
        (0.6, 2, 1.0, [1.0, 0.0, 0.0, 0.0]),  # top-k first, then top-p over what is left (as `generate`)
        (1.0, 1, 1.0, [1.0, 0.0, 0.0, 0.0]),
        (1.0, None, 0.5, [25 / 38, 9 / 38, 4 / 38, 0.0]),  # p ** (1 / T), renormalised
    ],
)
def test_draw_samples_from_the_tempered_truncated_distribution(top_p, top_k, temperature, expected):
    from llamaduo.infer import draw

    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])).repeat(20_000, 1)
    tokens = draw(logits, temperature, top_p, top_k)
    assert tokens.shape == (20_000,)
    freq = torch.bincount(tokens, minlength=4).float() / 20_000
    assert torch.allclose(freq, torch.tensor(expected), atol=0.012)


def test_generation_precision_keeps_greedy_and_small_models_in_fp32_and_casts_when_asked(tiny_model):  # noqa: F811
    from llamaduo.infer import for_generation

    def dtype(m):
        return next(m.parameters()).dtype

    model, _ = load_model(ModelConfig(base=str(tiny_model)))
    assert dtype(for_generation(model, InferConfig(temperature=0.0, precision="auto"))) == torch.float32
    assert dtype(for_generation(model, InferConfig(precision="auto"))) == torch.float32  # under 50M parameters
    assert dtype(for_generation(model, InferConfig(precision="bf16"))) == torch.bfloat16
    assert dtype(for_generation(model, InferConfig(precision="fp32"))) == torch.float32


def test_vllm_parallel_settings_are_validated_and_laid_over_the_visible_gpus():
    from llamaduo.config import ConfigError, from_dict
    from llamaduo.errors import UserError
    from llamaduo.vllm_backend import device_groups, engine_kwargs, shards

    cfg = from_dict({"infer": {"backend": "vllm", "vllm": {"tensor_parallel_size": 2, "data_parallel_size": 2,
                                                         "gpu_memory_utilization": 0.8, "max_model_len": 4096}}})
    v = cfg.infer.vllm
    assert device_groups(v, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    with pytest.raises(UserError, match=r"asks for 4 GPUs .* 3 are visible"):
        device_groups(v, ["0", "1", "2"])
    kw = engine_kwargs(v, "base", is_lora=True, lora_rank=32, seed=7)
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 4096 and kw["max_lora_rank"] == 32
    assert kw["gpu_memory_utilization"] == 0.8 and kw["enable_lora"] and kw["seed"] == 7
    assert [len(r) for r in shards(10, 3)] == [4, 3, 3] and shards(10, 3)[-1].stop == 10
    for bad in ({"tensor_parallel_size": 0}, {"gpu_memory_utilization": 1.5}, {"data_parallel": 2},
                {"distributed_executor_backend": "slurm"}):
        with pytest.raises(ConfigError):
            from_dict({"infer": {"vllm": bad}})


def fake_engine(shard, devices):
    """What one data-parallel engine returns for its shard (module level: a spawned process imports it)."""
    import os

    from llamaduo.artifacts import Completion

    return [Completion(prompt_id=e.id, sample_index=0, text=f"{devices}:{os.getpid()}", model_hash="", adapter_hash="")
            for e in shard]


def test_data_parallel_shards_run_in_their_own_processes_and_come_back_in_prompt_order():
    import os

    from llamaduo.vllm_backend import run_sharded

    test = tiny_examples(7)
    out = run_sharded(test, ["0,1", "2,3"], fake_engine)
    assert [c.prompt_id for c in out] == [e.id for e in test]
    devices = [c.text.split(":") for c in out]
    assert [d for d, _ in devices] == ["0,1"] * 4 + ["2,3"] * 3
    assert len({pid for _, pid in devices}) == 2 and str(os.getpid()) not in {pid for _, pid in devices}
    one = run_sharded(test[:1], ["0", "1"], fake_engine)  # fewer prompts than engines: one shard, in this process
    assert one[0].text == f"0:{os.getpid()}"


def test_a_vllm_layout_under_the_transformers_backend_is_refused_naming_both_settings():
    from llamaduo.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"infer.vllm .* infer.backend=transformers"):
        from_dict({"infer": {"backend": "transformers", "vllm": {"tensor_parallel_size": 2}}})
    assert from_dict({"infer": {"backend": "auto", "vllm": {"tensor_parallel_size": 2}}}).infer.vllm.tensor_parallel_size == 2
