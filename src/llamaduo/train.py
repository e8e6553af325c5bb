"""Fine-tuning one round: LoRA / QLoRA / full SFT with TRL, loss on the assistant tokens only.

Examples are tokenized here with `models.encode_prompt` (the same function inference uses)
and handed to TRL's `SFTTrainer` already tokenized, with a completion mask, so the loss
covers only what the model must learn to say. Runs unchanged under `accelerate launch`:
the Trainer shards the data and only the main process writes the adapter.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llamaduo.config import Config
from llamaduo.data import Example
from llamaduo.errors import UserError


class TrainError(UserError):
    pass


class TrainResult(BaseModel):
    adapter_dir: Path
    method: str
    train_loss: float
    val_loss: float | None = None
    steps: int
    examples: int
    tokens: int  # non-padding tokens seen (all epochs)
    seconds: float
    tokens_per_s: float
    lora_r: int | None = None
    lora_alpha: int | None = None
    resumed_from_step: int | None = None


def lora_schedule(n_examples: int) -> tuple[int, int]:
    """The paper's rank/alpha by data size: 8/16, then 16/32 from 10k, 32/64 from 100k examples."""
    if n_examples >= 100_000:
        return 32, 64
    if n_examples >= 10_000:
        return 16, 32
    return 8, 16


def tokenize_example(tokenizer: Any, example: Example, max_length: int) -> dict[str, list[int]]:
    """input_ids = prompt + target turn; completion_mask marks the target tokens (the loss)."""
    from llamaduo.models import completion_text, encode_prompt

    prompt_ids = encode_prompt(tokenizer, example.prompt_messages)
    target_ids = tokenizer(completion_text(tokenizer, example.messages), add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + target_ids)[:max_length]
    mask = ([0] * len(prompt_ids) + [1] * len(target_ids))[:max_length]
    return {"input_ids": ids, "completion_mask": mask}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _last_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    cks = [p for p in ckpt_dir.iterdir() if p.name.startswith("checkpoint-") and p.name.split("-")[-1].isdigit()]
    return max(cks, key=lambda p: int(p.name.split("-")[-1])) if cks else None


def train(
    cfg: Config,
    examples: list[Example],
    out_dir: Path,
    init_adapter: Path | None = None,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> TrainResult:
    """Train on `examples` and save the adapter (or full model) to `out_dir`, atomically."""
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from llamaduo import models

    tc = cfg.train
    if tc.method == "qlora" and not torch.cuda.is_available():
        raise TrainError("QLoRA needs a CUDA GPU with bitsandbytes; use train.method=lora on a CPU")
    if not examples:
        raise TrainError("no training examples")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir.parent / "checkpoints"
    set_seed(cfg.seed)
    if model is None or tokenizer is None:
        model_cfg = cfg.model
        if tc.method == "qlora":
            model_cfg = model_cfg.model_copy(update={"dtype": "bfloat16"})
        model, tokenizer = models.load_model(model_cfg, for_training=True)
    r, alpha = lora_schedule(len(examples))
    r = tc.lora_r or r
    alpha = tc.lora_alpha or (2 * r if tc.lora_r else alpha)
    if tc.method in ("lora", "qlora"):
        model = _attach_lora(model, tokenizer, cfg, r, alpha, init_adapter)
    elif init_adapter is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(init_adapter), dtype=model.dtype)

    rows = [tokenize_example(tokenizer, e, tc.max_length) for e in examples]
    rng = random.Random(cfg.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_val = int(len(rows) * tc.val_fraction)
    val_rows = [rows[i] for i in order[:n_val]]
    train_rows = [rows[i] for i in order[n_val:]]
    train_ds = Dataset.from_list(train_rows)
    val_ds = Dataset.from_list(val_rows) if val_rows else None

    bf16 = cfg.model.dtype == "bfloat16" or (tc.method == "qlora")
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=tc.batch_size,
        per_device_eval_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.grad_accum,
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=tc.warmup_ratio,
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps or -1,
        logging_steps=tc.logging_steps,
        save_strategy="steps" if tc.save_steps else "no",
        save_steps=tc.save_steps or 500,
        eval_strategy="no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=tc.gradient_checkpointing,
        max_length=tc.max_length,
        packing=tc.packing,
        completion_only_loss=True,
        dataset_kwargs={},
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer
    )
    resume = _last_checkpoint(ckpt_dir) if tc.save_steps else None
    t0 = time.monotonic()
    out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.monotonic() - t0
    val_loss = None
    if val_ds is not None:
        val_loss = float(trainer.evaluate()["eval_loss"])
    epochs = tc.epochs if not tc.max_steps else out.global_step * tc.batch_size * tc.grad_accum / max(1, len(train_rows))
    tokens = int(sum(len(r["input_ids"]) for r in train_rows) * epochs)
    if trainer.is_world_process_zero():
        _save_atomically(trainer.model, tokenizer, out_dir)
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the round is done; its checkpoints are not needed
    return TrainResult(
        adapter_dir=out_dir,
        method=tc.method,
        train_loss=float(out.training_loss),
        val_loss=val_loss,
        steps=int(out.global_step),
        examples=len(train_rows),
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds else 0.0,
        lora_r=r if tc.method != "full" else None,
        lora_alpha=alpha if tc.method != "full" else None,
        resumed_from_step=int(resume.name.split("-")[-1]) if resume else None,
    )


def _attach_lora(model: Any, tokenizer: Any, cfg: Config, r: int, alpha: int, init_adapter: Path | None) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    from llamaduo import models

    if init_adapter is not None:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    extra: dict[str, Any] = {}
    new_tokens = models.added_token_ids(model, tokenizer)
    if new_tokens:
        # Template tokens added to a base vocabulary must be learned, and saved with the adapter.
        extra["trainable_token_indices"] = {"embed_tokens": new_tokens}
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=cfg.train.lora_dropout,
        target_modules=cfg.train.target_modules,
        task_type="CAUSAL_LM",
        **extra,
    )
    return get_peft_model(model, lora)


def _save_atomically(model: Any, tokenizer: Any, out_dir: Path) -> None:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
