"""Training throughput: `llamaduo train`'s settings against a plain TRL `SFTTrainer` at its defaults.

    python benchmarks/train_throughput.py --model tiny
    python benchmarks/train_throughput.py --model gemma-270m --steps 8

Both arms train the same LoRA (rank/alpha from the paper's schedule, same learning rate,
schedule, seed, max length and effective batch) on No Robots `Summarize` (from the shared
data directory) with the loss on the assistant tokens. They differ only in how the work is
done: the baseline keeps TRL 1.x's defaults (gradient checkpointing, bf16 autocast, padded
batches, the LM head and its entropy/accuracy metrics over every position); llamaduo trains
padding-free, without checkpointing, with bf16 where the CPU computes it natively and with
the LM head only at completion positions. Each arm runs in its own process (so peak memory
is its own), then both trained adapters are scored by one function: mean cross-entropy on
the assistant tokens of the same held-out examples, in fp32, one example at a time.

Last line:

    speedup=<ours non-padding tokens/s ÷ baseline's> loss_ratio=<ours held-out loss ÷ baseline's> peak_mem_ratio=<ours ÷ baseline>
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llamaduo.config import ModelConfig, from_dict  # noqa: E402
from llamaduo.data import Example, Message  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "no_robots" / "no_robots.jsonl"
LR, SCHEDULER, WARMUP, SEED = 2e-4, "cosine", 0.1, 0


def load_split(path: Path, heldout: int) -> tuple[list[Example], list[Example]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    exs = [
        Example(
            id=r["id"], category=r["category"],
            messages=[Message(role="user", content=r["prompt"]), Message(role="assistant", content=r["response"])],
        )
        for r in rows
        if r["category"] == "Summarize"
    ]
    random.Random(SEED).shuffle(exs)
    return exs[heldout:], exs[:heldout]


def model_dir(name: str, work: Path) -> Path:
    from llamaduo import models

    if name == "tiny":
        from llamaduo.demo.tiny import build_tiny_model

        return build_tiny_model(work / "tiny-model", seed=0)
    from llamaduo.demo.run import cache_dir, prepare_student

    student = prepare_student(False, cache_dir())
    return Path(models.resolve_base(ModelConfig(**student)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


# ----------------------------------------------------------------------- the two arms
def run_ours(args: argparse.Namespace, train_set: list[Example], base: Path, out: Path) -> dict:
    from llamaduo.train import train, use_bf16

    cfg = from_dict({
        "seed": SEED,
        "model": {"base": str(base)},
        "train": {
            "learning_rate": LR, "lr_scheduler": SCHEDULER, "warmup_ratio": WARMUP, "epochs": 1.0,
            "max_steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
            "max_length": args.max_length, "save_steps": None,
        },
    }, overrides=args.set)
    res = train(cfg, train_set, out, progress=False)
    return {
        "tokens": res.tokens, "seconds": res.seconds, "steps": res.steps, "peak_mb": peak_rss_mb(),
        "adapter": str(out), "lora_r": res.lora_r, "lora_alpha": res.lora_alpha, "bf16": use_bf16(cfg),
        "train_loss": res.train_loss,
    }


def run_baseline(args: argparse.Namespace, train_set: list[Example], base: Path, out: Path) -> dict:
    """What a user writes from TRL's quick start: conversational prompt/completion data, defaults."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from llamaduo.models import load_tokenizer
    from llamaduo.train import lora_schedule

    tok, _ = load_tokenizer(ModelConfig(base=str(base)))  # the same chat template as ours
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    ds = Dataset.from_list([
        {
            "prompt": [m.model_dump() for m in e.prompt_messages],
            "completion": [e.messages[-1].model_dump()],
        }
        for e in train_set
    ])
    r, alpha = lora_schedule(len(train_set))
    sft = SFTConfig(
        output_dir=str(out.parent / "baseline-ckpt"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length,
        num_train_epochs=1.0,
        max_steps=args.steps or -1,
        learning_rate=LR,
        lr_scheduler_type=SCHEDULER,
        warmup_steps=WARMUP,
        seed=SEED,
        save_strategy="no",
        report_to=[],
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),  # TRL refuses its bf16 default on CPU without it
    )
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=tok, peft_config=lora)
    t0 = time.monotonic()
    result = trainer.train()
    seconds = time.monotonic() - t0
    peak = peak_rss_mb()
    trainer.model.save_pretrained(str(out))
    return {
        "tokens": int(trainer.state.num_input_tokens_seen), "seconds": seconds, "steps": int(result.global_step),
        "peak_mb": peak, "adapter": str(out), "lora_r": r, "lora_alpha": alpha, "bf16": bool(sft.bf16),
        "train_loss": float(result.training_loss),
    }


def heldout_loss(base: Path, adapter: Path, heldout: list[Example], max_length: int) -> float:
    """Mean cross-entropy per assistant token over the held-out examples: fp32, one at a time, no padding."""
    import torch
    from torch.nn import functional as F

    from llamaduo.models import load_model
    from llamaduo.train import tokenize_example

    model, tok = load_model(ModelConfig(base=str(base), dtype="float32"), adapter=adapter)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for e in heldout:
            row = tokenize_example(tok, e, max_length)
            ids = torch.tensor([row["input_ids"]])
            target = torch.tensor(row["input_ids"][1:])
            mask = torch.tensor(row["completion_mask"][1:], dtype=torch.bool)
            if not mask.any():
                continue  # the prompt alone fills max_length
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits[mask], target[mask], reduction="sum"))
            count += int(mask.sum())
    return nll / count


def arm_main(args: argparse.Namespace) -> None:
    work = Path(args.work)
    base = Path(args.base)
    train_set, heldout = load_split(Path(args.data), args.heldout)
    out = work / f"{args.arm}-adapter"
    result = (run_ours if args.arm == "ours" else run_baseline)(args, train_set, base, out)
    result["heldout_loss"] = heldout_loss(base, out, heldout, args.max_length)
    (work / f"{args.arm}.json").write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "gemma-270m"], default="tiny")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default: one epoch)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--heldout", type=int, default=32, help="held-out examples scored after training")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--arms", default="baseline,ours")
    ap.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE", help="override ours' config")
    ap.add_argument("--arm", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        arm_main(args)
        return
    if not Path(args.data).exists():
        sys.exit(f"{args.data}: not found (No Robots JSONL from the shared data directory; pass --data)")
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="llamaduo-train-bench-") as tmp:
        work = Path(tmp)
        base = model_dir(args.model, work)
        results: dict[str, dict] = {}
        for arm in args.arms.split(","):
            console.print(f"[bold]{arm}[/]: training {args.model} ...")
            cmd = [
                sys.executable, __file__, "--arm", arm, "--work", str(work), "--base", str(base),
                "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
                "--max-length", str(args.max_length), "--heldout", str(args.heldout), "--data", args.data,
            ]
            if args.steps:
                cmd += ["--steps", str(args.steps)]
            for override in args.set:
                cmd += ["--set", override]
            subprocess.run(cmd, check=True)
            results[arm] = json.loads((work / f"{arm}.json").read_text())
    table = Table(title=f"training throughput: {args.model}, batch {args.batch_size}×{args.grad_accum}, max length {args.max_length}")
    for col in ("arm", "steps", "tokens", "seconds", "tokens/s", "peak MB", "bf16", "train loss", "held-out loss"):
        table.add_column(col, justify="right")
    for arm, r in results.items():
        table.add_row(
            arm, str(r["steps"]), str(r["tokens"]), f"{r['seconds']:.1f}", f"{r['tokens'] / r['seconds']:.1f}",
            f"{r['peak_mb']:.0f}", str(r["bf16"]), f"{r['train_loss']:.4f}", f"{r['heldout_loss']:.4f}",
        )
    Console(width=140).print(table)
    if {"ours", "baseline"} <= results.keys():
        o, b = results["ours"], results["baseline"]
        speedup = (o["tokens"] / o["seconds"]) / (b["tokens"] / b["seconds"])
        print(
            f"speedup={speedup:.2f} loss_ratio={o['heldout_loss'] / b['heldout_loss']:.4f} "
            f"peak_mem_ratio={o['peak_mb'] / b['peak_mb']:.2f}"
        )


if __name__ == "__main__":
    main()
