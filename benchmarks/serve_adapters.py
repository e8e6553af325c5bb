"""`serve_load.py --adapters N`: N LoRA adapters of one base served from one process vs N processes.

    python benchmarks/serve_load.py --model tiny --adapters 4 --clients 32 --requests 256

Builds the tiny base and N LoRA adapters (random weights, so each answers differently), then
  1. one server process with all N adapters (`llamaduo serve A B C D`): its resident memory,
     and `--requests` requests from `--clients` clients spread over the N model names,
  2. N server processes of one adapter each: their summed resident memory, and the same
     requests, each sent to the process serving its model.
The last line is exactly:

    adapters=<N> memory_ratio=<one process ÷ N processes> throughput_ratio=<one ÷ N (req/s)> errors=<n>
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from serve_load import concurrent, rss_mb, start_server


def build_adapters(base: Path, out: Path, n: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from llamaduo.config import ModelConfig
    from llamaduo.models import load_model

    dirs = []
    for i in range(n):
        model, tok = load_model(ModelConfig(base=str(base)))
        torch.manual_seed(i + 1)
        peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                init_lora_weights=False, lora_alpha=16))
        d = out / f"task-{chr(ord('a') + i)}"
        peft.save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    return dirs


def run_adapters(args) -> int:
    from llamaduo.demo.tiny import build_tiny_model

    n = args.adapters
    with tempfile.TemporaryDirectory() as tmp:
        if args.model != "tiny":
            raise SystemExit("--adapters builds its adapters on the tiny model: use --model tiny")
        base = build_tiny_model(Path(tmp) / "tiny")
        dirs = build_adapters(base, Path(tmp), n)
        names = [d.name for d in dirs]
        max_batch = args.max_batch or args.clients

        def load(urls: list[str]) -> tuple[float, int]:
            asyncio.run(concurrent(urls, names, args.clients, args.clients, args.max_tokens))  # warm-up
            took, _, errors = asyncio.run(concurrent(urls, names, args.requests, args.clients, args.max_tokens))
            return args.requests / took, errors

        proc, url, _ = start_server([str(d) for d in dirs], max_batch, args.batch_wait_ms, args.max_tokens)
        try:
            one_rps, one_err = load([url] * n)
            one_mb = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
        procs = []
        try:
            for d in dirs:
                procs.append(start_server([str(d)], max_batch, args.batch_wait_ms, args.max_tokens))
            many_rps, many_err = load([u for _, u, _ in procs])
            many_mb = sum(rss_mb(p.pid) for p, _, _ in procs)
        finally:
            for p, _, _ in procs:
                p.terminate()
                p.wait(10)
    errors = one_err + many_err
    print(f"model {args.model}, {n} adapters, {args.requests} requests from {args.clients} clients, "
          f"max_tokens {args.max_tokens}")
    print(f"{'setup':<28}{'RSS MB':>10}{'req/s':>9}")
    print(f"{'one process, ' + str(n) + ' adapters':<28}{one_mb:>10.0f}{one_rps:>9.1f}")
    print(f"{str(n) + ' processes, 1 adapter each':<28}{many_mb:>10.0f}{many_rps:>9.1f}")
    print(f"adapters={n} memory_ratio={one_mb / many_mb:.3f} throughput_ratio={one_rps / many_rps:.2f} errors={errors}")
    return 0 if errors == 0 else 1
