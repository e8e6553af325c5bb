"""Batch inference throughput: `llamaduo infer`'s generation against one prompt at a time with `generate`.

    python benchmarks/infer_throughput.py --model tiny
    python benchmarks/infer_throughput.py --model gemma-270m

Both sides answer the same No Robots `Summarize` prompts (the longest that fit `--max-prompt-tokens`,
chat-formatted) with the pipeline's settings: K samples per prompt at the configured temperature,
`--new-tokens` new tokens at most, stopping at the end of the turn. The baseline is what a user
writes with transformers: per prompt, `model.generate(..., num_return_sequences=K)` on the model
loaded as saved (fp32). llamaduo's side is `infer.generate` as a round runs it: length-sorted
batches, each prompt prefilled once and its K samples decoded together with attention that reads
the prompt's cache once for all K (`decode.py`), bf16 weights for sampling where the CPU computes
bf16 natively (models of 50M parameters and more). Throughput is generated tokens (up to each
sample's end) per second.

Then greedy decoding checks that batching changes nothing: llamaduo's batched greedy answers
against `generate` one prompt at a time on the same weights. Last line:

    speedup=<ours tokens/s ÷ baseline's> identical_greedy=<true|false>
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import DATA, model_dir  # noqa: E402

from llamaduo.config import InferConfig, ModelConfig  # noqa: E402
from llamaduo.data import Message  # noqa: E402


def pick_prompts(tok: object, path: Path, n: int, max_tokens: int) -> list[tuple[str, list[Message]]]:
    from llamaduo.models import encode_prompt

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r["category"] == "Summarize"]
    random.Random(0).shuffle(rows)
    sized = [(len(encode_prompt(tok, [Message(role="user", content=r["prompt"])])), r) for r in rows]
    sized = sorted((s for s in sized if s[0] <= max_tokens), key=lambda s: -s[0])[:n]
    return [(r["id"], [Message(role="user", content=r["prompt"])]) for _, r in sized]


def one_at_a_time(model: object, tok: object, prompts: list, cfg: InferConfig, seed: int) -> tuple[list[list[int]], float]:
    """Per prompt, `generate` with K return sequences: what a user writes without a batching layer."""
    import torch

    from llamaduo.infer import stop_token_ids
    from llamaduo.models import encode_prompt

    eos = stop_token_ids(model, tok)
    greedy = cfg.temperature == 0
    kw: dict = {"max_new_tokens": cfg.max_new_tokens, "pad_token_id": tok.pad_token_id, "eos_token_id": eos}
    kw.update(do_sample=False) if greedy else kw.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
    outs: list[list[int]] = []
    torch.manual_seed(seed)
    t0 = time.monotonic()
    with torch.inference_mode():
        for _, msgs in prompts:
            ids = torch.tensor([encode_prompt(tok, msgs)])
            out = model.generate(input_ids=ids, num_return_sequences=1 if greedy else cfg.num_samples, **kw)
            for seq in out[:, ids.shape[1]:].tolist():
                ends = [i for i, t in enumerate(seq) if t in eos]
                outs.append(seq[: ends[0]] if ends else seq)
    return outs, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "gemma-270m"], default="tiny")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--samples", type=int, default=InferConfig().num_samples, help="K samples per prompt")
    ap.add_argument("--temperature", type=float, default=InferConfig().temperature)
    ap.add_argument("--batch-size", type=int, default=InferConfig().batch_size, help="prompts per batch (ours)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default=InferConfig().precision)
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"{args.data}: not found (No Robots JSONL from the shared data directory; pass --data)")

    from rich.console import Console
    from rich.table import Table

    from llamaduo.infer import for_generation, generate
    from llamaduo.models import encode_prompt, load_model

    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="llamaduo-infer-bench-") as tmp:
        base = model_dir(args.model, Path(tmp))
        cfg = InferConfig(
            num_samples=args.samples, temperature=args.temperature, max_new_tokens=args.new_tokens,
            batch_size=args.batch_size, precision=args.precision,
        )
        fp32_model, tok = load_model(ModelConfig(base=str(base), dtype="float32"))
        ours_model = for_generation(load_model(ModelConfig(base=str(base), dtype="float32"))[0], cfg)
        ours_dtype = str(next(ours_model.parameters()).dtype).replace("torch.", "")
        prompts = pick_prompts(tok, Path(args.data), args.prompts, args.max_prompt_tokens)
        lengths = [len(encode_prompt(tok, msgs)) for _, msgs in prompts]
        console.print(f"{len(prompts)} prompts, {min(lengths)}–{max(lengths)} tokens; K={cfg.num_samples}, "
                      f"T={cfg.temperature}, {cfg.max_new_tokens} new tokens; ours in {ours_dtype}")

        rows = []
        console.print("baseline: one prompt at a time, fp32 ...")
        base_out, base_s = one_at_a_time(fp32_model, tok, prompts, cfg, seed=0)
        base_tokens = sum(map(len, base_out))
        rows.append(("one at a time (fp32)", "sampled", base_tokens, base_s))
        console.print("llamaduo: batched ...")
        t0 = time.monotonic()
        ours = generate(ours_model, tok, prompts, cfg, seed=0)
        ours_s = time.monotonic() - t0
        ours_tokens = sum(c.new_tokens for c in ours)
        rows.append((f"llamaduo ({ours_dtype})", "sampled", ours_tokens, ours_s))

        greedy = cfg.model_copy(update={"temperature": 0.0, "num_samples": 1})
        del ours_model
        greedy_model = for_generation(fp32_model, greedy)
        greedy_dtype = str(next(greedy_model.parameters()).dtype).replace("torch.", "")
        console.print(f"greedy: llamaduo batched vs one at a time, same weights ({greedy_dtype}) ...")
        t0 = time.monotonic()
        ours_greedy = generate(greedy_model, tok, prompts, greedy, seed=0)
        greedy_s = time.monotonic() - t0
        single_greedy, single_s = one_at_a_time(greedy_model, tok, prompts, greedy, seed=0)
        rows.append((f"one at a time ({greedy_dtype})", "greedy", sum(map(len, single_greedy)), single_s))
        rows.append((f"llamaduo ({greedy_dtype})", "greedy", sum(c.new_tokens for c in ours_greedy), greedy_s))
        texts = [tok.decode(s, skip_special_tokens=True).strip() for s in single_greedy]
        identical = texts == [c.text for c in ours_greedy]

    table = Table(title=f"inference throughput: {args.model}, {len(prompts)} prompts, batch {cfg.batch_size}")
    for col in ("run", "decoding", "new tokens", "seconds", "tokens/s"):
        table.add_column(col, justify="right")
    for name, mode, tokens, secs in rows:
        table.add_row(name, mode, str(tokens), f"{secs:.1f}", f"{tokens / secs:.1f}")
    Console(width=120).print(table)
    print(f"greedy_speedup={(rows[3][2] / rows[3][3]) / (rows[2][2] / rows[2][3]):.2f}")
    speedup = (ours_tokens / ours_s) / (base_tokens / base_s)
    print(f"speedup={speedup:.2f} identical_greedy={'true' if identical else 'false'}")


if __name__ == "__main__":
    main()
