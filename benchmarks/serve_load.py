"""Load test of `llamaduo serve`: batching gain under concurrent clients, and the server's own overhead.

    python benchmarks/serve_load.py --model tiny --clients 32 --requests 256

Starts the server (in a separate process, so client and server do not share an interpreter
lock) on 127.0.0.1, then sends the same requests
  1. one at a time (sequential throughput and per-request latency), each paired with a direct
     call of the same generator in this process (so both latencies see the same machine load),
  2. from `--clients` concurrent clients (batched throughput).
The last line is exactly:

    concurrency_speedup=<ratio> p50_overhead_pct=<percent> errors=<n>

speedup = concurrent req/s ÷ sequential req/s; overhead = (server p50 − direct p50) ÷ direct p50.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = [
    "Hello, this is Ana Costa in Porto. Please send me 2 desk lamps.",
    "Cancel my order of one blue mug.",
    "Write a haiku about the sea.",
    "Summarize: the meeting moved to Friday at 10, bring the budget draft.",
    "Classify the sentiment: the kettle arrived broken and support never answered.",
    "What is the capital of France?",
    "I would like to return the yoga mat I bought last week, it is too thin.",
    "Translate to French: good morning, how are you?",
]


def prompt(i: int) -> str:
    return f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"


def serve_child(model_dir: str, max_batch: int, wait_ms: float, max_tokens: int) -> None:
    """The server process: prints `PORT NAME` once listening, then serves until terminated."""
    from llamaduo.config import Config
    from llamaduo.serve import BackgroundServer, build_app

    cfg = Config(
        infer={"temperature": 0.0, "max_new_tokens": max_tokens, "num_samples": 1},
        serve={"max_batch": max_batch, "batch_wait_ms": wait_ms},
    )
    app, name = build_app(Path(model_dir), cfg)
    srv = BackgroundServer(app, "127.0.0.1", 0, name).start()
    print(srv.port, name, flush=True)
    srv.thread.join()


def body(i: int, model: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens, "temperature": 0}


def sequential(url: str, model: str, n: int, max_tokens: int, direct=None) -> tuple[float, list[float], list[float], int]:
    """One request at a time; with `direct`, each server call is paired with a direct generate call
    on the same prompt, so both latencies are taken under the same machine load."""
    import httpx

    lat, direct_lat, errors, server_s = [], [], 0, 0.0
    with httpx.Client(timeout=300) as c:
        for i in range(n):
            if direct is not None:
                t = time.perf_counter()
                direct(i)
                direct_lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = c.post(url, json=body(i, model, max_tokens))
            lat.append(time.perf_counter() - t)
            server_s += lat[-1]
            errors += r.status_code != 200
    return server_s, lat, direct_lat, errors


async def concurrent(url: str, model: str, n: int, clients: int, max_tokens: int) -> tuple[float, list[float], int]:
    import httpx

    todo = iter(range(n))
    lat: list[float] = []
    errors = 0

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in todo:
            t = time.perf_counter()
            try:
                r = await c.post(url, json=body(i, model, max_tokens))
                errors += r.status_code != 200
            except httpx.HTTPError:
                errors += 1
            lat.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(c) for _ in range(clients)])
        return time.perf_counter() - t0, lat, errors


def direct_caller(model_dir: Path, max_tokens: int):
    """The same generator the server runs, called in this process for one request."""
    from llamaduo.batcher import local_generator
    from llamaduo.config import InferConfig, ModelConfig
    from llamaduo.data import Message
    from llamaduo.models import load_model

    model, tok = load_model(ModelConfig(base=str(model_dir)))
    gen = local_generator(model, tok)
    sampling = InferConfig(temperature=0.0, max_new_tokens=max_tokens, num_samples=1, batch_size=1)

    def call(i: int) -> None:
        gen([(str(i), [Message(role="user", content=prompt(i))])], sampling, 0)

    call(0)  # warm-up
    return call


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        model_dir, max_batch, wait_ms, max_tokens = sys.argv[2:6]
        serve_child(model_dir, int(max_batch), float(wait_ms), int(max_tokens))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (built in a temp dir) or a model directory")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=None, help="server max_batch (default: --clients)")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--sequential", type=int, default=None, help="requests sent one at a time (default: --requests)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            from llamaduo.demo.tiny import build_tiny_model

            model_dir = build_tiny_model(Path(tmp) / "tiny")
        else:
            model_dir = Path(args.model)
        child = [sys.executable, __file__, "--child", str(model_dir), str(args.max_batch or args.clients),
                 str(args.batch_wait_ms), str(args.max_tokens)]
        proc = subprocess.Popen(child, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            port, name = proc.stdout.readline().split()
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            n_seq = args.sequential or args.requests
            direct = direct_caller(model_dir, args.max_tokens)
            sequential(url, name, 8, args.max_tokens)  # warm-up
            asyncio.run(concurrent(url, name, args.clients, args.clients, args.max_tokens))
            seq_s, seq_lat, direct_lat, seq_err = sequential(url, name, n_seq, args.max_tokens, direct)
            con_s, con_lat, con_err = asyncio.run(concurrent(url, name, args.requests, args.clients, args.max_tokens))
        finally:
            proc.terminate()
            proc.wait(10)

    seq_rps, con_rps = n_seq / seq_s, args.requests / con_s
    p50_server, p50_direct = statistics.median(seq_lat), statistics.median(direct_lat)
    speedup = con_rps / seq_rps
    overhead = 100.0 * (p50_server - p50_direct) / p50_direct
    errors = seq_err + con_err
    print(f"model {args.model}, max_tokens {args.max_tokens}, max_batch {args.max_batch or args.clients}, "
          f"batch_wait_ms {args.batch_wait_ms:g}")
    print(f"{'phase':<28}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}")
    for label, n, rps, lat in (
        ("sequential (1 client)", n_seq, seq_rps, seq_lat),
        (f"concurrent ({args.clients} clients)", args.requests, con_rps, con_lat),
        ("direct generate (no server)", len(direct_lat), len(direct_lat) / sum(direct_lat), direct_lat),
    ):
        q = statistics.quantiles(lat, n=20)
        print(f"{label:<28}{n:>9}{rps:>9.1f}{1000 * statistics.median(lat):>9.1f}{1000 * q[18]:>9.1f}")
    print(f"concurrency_speedup={speedup:.2f} p50_overhead_pct={overhead:.1f} errors={errors}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
