"""Fine-tuning one round: LoRA / QLoRA / full SFT with TRL, loss on the assistant tokens only.

Examples are tokenized here with `models.encode_prompt` (the same function inference uses)
and handed to TRL's `SFTTrainer` already tokenized, with a completion mask, so the loss
(`train_loss.py`) covers only what the model must learn to say. Runs unchanged under
`accelerate launch`: the Trainer shards the data and only the main process writes the adapter.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from llamaduo.artifacts import TrainResult
from llamaduo.config import Config
from llamaduo.data import Example
from llamaduo.errors import UserError
from llamaduo.train_loss import completion_loss_trainer
from llamaduo.train_progress import quiet_libraries, rich_progress


class TrainError(UserError):
    pass


def lora_schedule(n_examples: int) -> tuple[int, int]:
    """The paper's rank/alpha by data size: 8/16, then 16/32 from 10k, 32/64 from 100k examples."""
    if n_examples >= 100_000:
        return 32, 64
    if n_examples >= 10_000:
        return 16, 32
    return 8, 16


def length_grouped_order(lengths: list[int], batch: int, seed: int, megabatch: int = 50) -> list[int]:
    """A seeded shuffle, then each run of `megabatch` batches sorted by length and cut into
    batches, whose order is shuffled again: batches hold examples of similar length (little
    padding) while the order of examples stays random."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    out: list[int] = []
    for start in range(0, len(order), batch * megabatch):
        chunk = sorted(order[start : start + batch * megabatch], key=lambda i: -lengths[i])
        batches = [chunk[j : j + batch] for j in range(0, len(chunk), batch)]
        rng.shuffle(batches)
        out += [i for b in batches for i in b]
    return out


def _varlen_attention(model: Any) -> bool:
    """Whether the model attends with flash-attention's variable-length kernels (padding-free is then free)."""
    return "flash" in str(getattr(model.config, "_attn_implementation", "") or "")


def use_bf16(cfg: Config) -> bool:
    """bf16 mixed precision for this run: asked for, needed (QLoRA, bf16 weights) or native under 'auto'."""
    tc = cfg.train
    if tc.method == "qlora" or cfg.model.dtype == "bfloat16" or tc.precision == "bf16":
        return True
    from llamaduo.models import bf16_native

    return tc.precision == "auto" and bf16_native()


def tokenize_example(tokenizer: Any, example: Example, max_length: int) -> dict[str, list[int]]:
    """input_ids = prompt + target turn; completion_mask marks the loss: the target's tokens, and in a
    tool conversation the assistant's earlier turns (its calls) too."""
    from llamaduo.infer import prompt_ids as encode
    from llamaduo.structure import completion_for, history_spans, prompt_for

    # A structured example (tools, tool turns, a response format) is rendered exactly as `serve`
    # renders the same request, so the model learns the token sequence it is served with.
    prompt = prompt_for(tokenizer, example)
    prompt_ids = encode(tokenizer, prompt)
    target_ids = tokenizer(completion_for(tokenizer, example), add_special_tokens=False)["input_ids"]
    prompt_mask = [0] * len(prompt_ids)
    spans = history_spans(tokenizer, example, prompt) if isinstance(prompt, str) and example.structured else []
    if spans and getattr(tokenizer, "is_fast", False):
        # The conversation's earlier assistant turns (its calls) are in the loss as well; user, system
        # and tool-result tokens are not. Offsets of the prompt tokenized whole, as `serve` tokenizes it.
        offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) == len(prompt_ids):
            prompt_mask = [int(any(a <= s and e <= b for a, b in spans) and e > s) for s, e in offsets]
    ids = (prompt_ids + target_ids)[:max_length]
    mask = (prompt_mask + [1] * len(target_ids))[:max_length]
    return {"input_ids": ids, "completion_mask": mask}


CHECKPOINT_COMPLETE = "llamaduo-complete"
"""Written into `checkpoint-N/` once the Trainer has saved all of it: the Trainer writes a checkpoint
in place, file by file, so a kill or a full disk mid-save leaves a folder that must not be resumed."""


def _last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (cut off mid-write) are removed."""
    if not ckpt_dir.is_dir():
        return None
    cks = [p for p in ckpt_dir.iterdir() if p.name.startswith("checkpoint-") and p.name.split("-")[-1].isdigit()]
    complete = [p for p in cks if (p / CHECKPOINT_COMPLETE).is_file()]
    for p in set(cks) - set(complete):
        shutil.rmtree(p, ignore_errors=True)
    return max(complete, key=lambda p: int(p.name.split("-")[-1])) if complete else None


def _mark_complete_callback() -> Any:
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        """After the Trainer's save of a checkpoint returns, mark it complete (fsynced)."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                done = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_COMPLETE
                if done.parent.is_dir():
                    with open(done, "w") as fh:
                        fh.write(f"{state.global_step}\n")
                        fh.flush()
                        os.fsync(fh.fileno())

    return MarkComplete()


_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _disk_full(e: BaseException) -> bool:
    """A save that failed for want of space (torch and safetensors say so in their own words)."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    text = str(e).lower()
    # torch's zip writer reports a short write as "unexpected pos" or "file write failed".
    words = ("no space left", "file too large", "file write failed", "disk quota", "unexpected pos", "pytorchstreamwriter")
    return any(w in text for w in words)


def _reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1][:120]


def train(
    cfg: Config,
    examples: list[Example],
    out_dir: Path,
    init_adapter: Path | None = None,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train on `examples` and save the adapter (or full model) to `out_dir`, atomically.

    `callbacks` are extra transformers `TrainerCallback`s (e.g. to report or stop early).
    If `out_dir.parent / "checkpoints"` holds a checkpoint of an interrupted call, training
    resumes from it; the caller must remove checkpoints made from different inputs.
    """
    import torch

    if cfg.train.method == "qlora":
        if not torch.cuda.is_available():
            raise TrainError("QLoRA needs a CUDA GPU with bitsandbytes; use train.method=lora on CPU")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TrainError("QLoRA needs bitsandbytes: pip install bitsandbytes (or use train.method=lora)") from None
    if not examples:
        raise TrainError("no training examples")
    with quiet_libraries():
        return _train(cfg, examples, Path(out_dir), init_adapter, model, tokenizer, progress, callbacks or [])


def _train(
    cfg: Config,
    examples: list[Example],
    out_dir: Path,
    init_adapter: Path | None,
    model: Any,
    tokenizer: Any,
    progress: bool,
    callbacks: list[Any],
) -> TrainResult:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from llamaduo import models

    tc = cfg.train
    ckpt_dir = out_dir.parent / "checkpoints"
    set_seed(cfg.seed)
    if model is None or tokenizer is None:
        model_cfg = cfg.model
        if tc.method == "qlora" or (tc.method == "lora" and use_bf16(cfg)):
            # LoRA's base is frozen: bf16 weights halve its memory and skip autocast's per-step casts;
            # the adapter itself stays fp32 (PEFT's default). Full fine-tuning keeps fp32 master weights.
            model_cfg = model_cfg.model_copy(update={"dtype": "bfloat16"})
        model, tokenizer = models.load_model(model_cfg, for_training=True, quantize_4bit=tc.method == "qlora")
    if tc.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Norms to fp32, inputs that carry gradients into the frozen 4-bit layers.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tc.gradient_checkpointing)
    r, alpha = lora_schedule(len(examples))
    r = tc.lora_r or r
    alpha = tc.lora_alpha or (2 * r if tc.lora_r else alpha)
    if tc.method in ("lora", "qlora"):
        model = _attach_lora(model, cfg, r, alpha, init_adapter)
    elif init_adapter is not None:
        from transformers import AutoModelForCausalLM

        # Full fine-tuning continues from the previous round's whole model.
        model = AutoModelForCausalLM.from_pretrained(str(init_adapter), dtype=model.dtype)

    rows = [tokenize_example(tokenizer, e, tc.max_length) for e in examples]
    # An example whose prompt fills max_length has nothing left to learn from: drop it, say how many.
    rows = [r for r in rows if any(r["completion_mask"])]
    too_long = len(examples) - len(rows)
    if not rows:
        raise TrainError(f"every example's prompt fills train.max_length={tc.max_length}; raise it")
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    n_val = int(len(rows) * tc.val_fraction)
    val_rows = [rows[i] for i in order[:n_val]]
    train_rows = [rows[i] for i in order[n_val:]]
    padding_free = tc.packing or (_varlen_attention(model) if tc.padding_free == "auto" else tc.padding_free)
    grouped = tc.group_by_length and not padding_free
    if grouped:
        step_batch = tc.batch_size * tc.grad_accum
        train_rows = [train_rows[i] for i in length_grouped_order([len(r["input_ids"]) for r in train_rows], step_batch, cfg.seed)]
    train_ds = Dataset.from_list(train_rows)
    val_ds = Dataset.from_list(val_rows) if val_rows else None

    args = SFTConfig(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=tc.batch_size,
        per_device_eval_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.grad_accum,
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=tc.warmup_ratio,  # a value below 1 is a ratio of the total steps
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps or -1,
        logging_steps=tc.logging_steps,
        save_strategy="steps" if tc.save_steps else "no",
        save_steps=tc.save_steps or 500,
        eval_strategy="no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        push_to_hub=False,
        bf16=use_bf16(cfg),
        fp16=False,
        activation_checkpointing=tc.gradient_checkpointing,
        # Examples are truncated when tokenized; padding-free rows must not be cut again.
        max_length=tc.max_length if tc.packing or not padding_free else None,
        packing=tc.packing,
        padding_free=padding_free,
        # A grouped order is fixed here (seeded), so a resumed round skips exactly the batches it ran.
        train_sampling_strategy="sequential" if grouped else "random",
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,  # our own bar below; the Trainer's prints every log dict
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = completion_loss_trainer(SFTTrainer)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.add_callback(rich_progress())
    trainer.add_callback(_mark_complete_callback())
    resume = _last_checkpoint(ckpt_dir)
    t0 = time.monotonic()
    try:
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (OSError, RuntimeError) as e:
        if not _disk_full(e):
            raise
        last = _last_checkpoint(ckpt_dir)  # also drops the checkpoint the full disk cut off
        raise TrainError(
            f"writing a checkpoint in {ckpt_dir} failed (disk full?): {_reason(e)}; free some space and rerun,"
            " training resumes from " + (f"{last.name}" if last else "the start (no complete checkpoint yet)")
        ) from None
    seconds = time.monotonic() - t0
    tokens = int(trainer.state.num_input_tokens_seen)
    session_tokens = tokens - int(getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0)
    val_loss = float(trainer.evaluate()["eval_loss"]) if val_ds is not None else None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # Sharded weights are gathered collectively: every rank takes part, the main one writes.
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if trainer.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(tmp))
        if trainer.is_world_process_zero():
            _finish_saved(tmp, tokenizer, out_dir)
    elif trainer.is_world_process_zero():
        try:
            _save_atomically(trainer.model, tokenizer, out_dir)
        except (OSError, RuntimeError) as e:
            if not _disk_full(e):
                raise
            shutil.rmtree(out_dir.with_name(out_dir.name + ".tmp"), ignore_errors=True)
            raise TrainError(f"saving the trained model to {out_dir} failed (disk full?): {_reason(e)}; free space and rerun") from None
    if trainer.is_world_process_zero():
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the round is done; its checkpoints are not needed
    trainer.accelerator.wait_for_everyone()  # every rank returns only once the adapter exists
    return TrainResult(
        adapter_dir=out_dir,
        method=tc.method,
        train_loss=float(out.training_loss),
        val_loss=val_loss,
        steps=int(out.global_step),
        examples=len(train_rows),
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=session_tokens / seconds if seconds else 0.0,
        lora_r=r if tc.method != "full" else None,
        lora_alpha=alpha if tc.method != "full" else None,
        resumed_from_step=int(resume.name.split("-")[-1]) if resume else None,
        dropped_too_long=too_long,
        bf16=bool(args.bf16),
        padding_free=padding_free,
    )


def _attach_lora(model: Any, cfg: Config, r: int, alpha: int, init_adapter: Path | None) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_adapter is not None:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=cfg.train.lora_dropout,
        target_modules=cfg.train.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _save_atomically(model: Any, tokenizer: Any, out_dir: Path) -> None:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "peft_config"):
        # Rows added for template tokens are rebuilt identically by `load_model`; never copy the embeddings.
        model.save_pretrained(str(tmp), save_embedding_layers=False)
    else:
        model.save_pretrained(str(tmp))
    _finish_saved(tmp, tokenizer, out_dir)


def _finish_saved(tmp: Path, tokenizer: Any, out_dir: Path) -> None:
    """Tokenizer and a portable config beside the weights in `tmp`, then `tmp` becomes `out_dir`."""
    tokenizer.save_pretrained(str(tmp))
    (tmp / "training_args.bin").unlink(missing_ok=True)  # `Trainer.save_model`'s pickle: not part of a model
    _portable_adapter_config(tmp)
    (tmp / "README.md").unlink(missing_ok=True)  # PEFT's placeholder card names local paths
    from llamaduo.filemodes import apply_umask

    apply_umask(tmp)  # safetensors writes 0600; a run directory follows the user's umask
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _portable_adapter_config(adapter_dir: Path) -> None:
    """Same weights → same bytes: sort PEFT's module set and keep no local path of the base."""
    path = adapter_dir / "adapter_config.json"
    if not path.exists():
        return
    conf = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(conf.get("target_modules"), list):
        conf["target_modules"] = sorted(conf["target_modules"])
    base = conf.get("base_model_name_or_path")
    if base and Path(base).is_absolute():
        conf["base_model_name_or_path"] = Path(base).name  # the loader is always given the base explicitly
    path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n", encoding="utf-8")
