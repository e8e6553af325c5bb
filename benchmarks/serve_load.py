"""Load test of `llamaduo serve`: batching gain under concurrent clients, and the server's own overhead.

    python benchmarks/serve_load.py --model tiny --clients 32 --requests 256 [--stream]
    python benchmarks/serve_load.py --model tiny --adapters 4 --clients 32 --requests 256
    python benchmarks/serve_load.py --model gemma-270m --clients 8 --requests 32 --stream --against llamacpp

Starts the server (in a separate process, so client and server do not share an interpreter
lock) on 127.0.0.1, then sends the same requests
  1. one at a time (sequential throughput and per-request latency), each paired with a direct
     call of the same generator in this process (so both latencies see the same machine load),
  2. from `--clients` concurrent clients (batched throughput).
The last line is exactly:

    concurrency_speedup=<ratio> p50_overhead_pct=<percent> errors=<n>

speedup = concurrent req/s ÷ sequential req/s; overhead = (server p50 − direct p50) ÷ direct p50.
Each sequential request is also paired with a call of the server's own engine (`rowbatch.RowBatch`,
no HTTP, no threads), shown in the table with the server's latency over it (HTTP, the event loop
and the generation thread alone) and its own over direct generate.
With `--stream` every request streams, and the line adds the concurrent phase's time to the
first content chunk: `... ttft_p50_ms=<t> ttft_ratio=<ttft p50 ÷ full-latency p50> errors=<n>`.

`--adapters N` (see `serve_adapters.py`) serves N LoRA adapters of the tiny base from one process
vs N processes of one adapter each; `--against llamacpp` (see `serve_vs_llamacpp.py`) compares
streaming throughput and first-token time with llama.cpp's OpenAI-compatible server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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


def serve_child(model_dirs: list[str], max_batch: int, wait_ms: float, max_tokens: int, precision: str = "auto",
                serve: dict | None = None) -> None:
    """The server process: prints `PORT NAME DTYPE` once listening, then serves until terminated.

    `precision` is the run's `infer.precision`, which the infer stage (the judged answers) and
    `serve` both generate in ("int8-int4head": int8 with `infer.int4_lm_head`); DTYPE is what the
    served weights are in; `serve`: more `serve` settings (`SERVE`)."""
    from llamaduo.config import Config
    from llamaduo.serve import BackgroundServer, build_app

    cfg = Config(
        infer={"temperature": 0.0, "max_new_tokens": max_tokens, "num_samples": 1,
               "precision": precision.removesuffix("-int4head"), "int4_lm_head": precision.endswith("-int4head")},
        serve={"max_batch": max_batch, "batch_wait_ms": wait_ms, "max_tokens_limit": max(2048, max_tokens),
               **(serve or {})},
    )
    app, name = build_app([Path(d) for d in model_dirs] if len(model_dirs) > 1 else Path(model_dirs[0]), cfg)
    srv = BackgroundServer(app, "127.0.0.1", 0, name).start()
    model = getattr(getattr(app.state.batcher, "batch", None), "model", None)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.") if model is not None else "n/a"
    if model is not None:
        from llamaduo.quantize import Int4Linear, int8_weights

        head = "+int4-head" if isinstance(model.get_output_embeddings(), Int4Linear) else ""
        dtype = f"int8-linears{head}+{dtype}" if int8_weights(model) else dtype
    print(srv.port, name, dtype, flush=True)
    srv.thread.join()


EXTRA: dict = {}  # fields added to every request body (set per server by a comparison)
RENDER = None  # set: requests go to /v1/completions with the chat prompt rendered by this function


def body(i: int, model: str, max_tokens: int, stream: bool = False) -> dict:
    turn = {"messages": [{"role": "user", "content": prompt(i)}]} if RENDER is None else {"prompt": RENDER(prompt(i))}
    b = {"model": model, **turn, "max_tokens": max_tokens, "temperature": 0, **EXTRA}
    # Usage at the end of the stream: a chunk may carry several tokens, so chunks are not tokens.
    return {**b, "stream": True, "stream_options": {"include_usage": True}} if stream else b


@dataclass
class Result:
    latency: float  # seconds to the whole answer
    ttft: float | None  # seconds to the first content chunk (streamed requests)
    tokens: int  # content chunks streamed, or completion tokens
    ok: bool


def _stream_result(t: float, status: int, lines: list[tuple[float, str]]) -> Result:
    first, chunks, usage = None, 0, None
    for at, line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"].get("completion_tokens")
        # chat chunks carry delta.content, completions chunks text
        if any((c.get("delta") or {}).get("content") or c.get("text") for c in chunk.get("choices") or []):
            chunks += 1
            first = at if first is None else first
    end = lines[-1][0] if lines else time.perf_counter()
    tokens = usage if usage is not None else chunks  # a server without usage: one token per chunk
    return Result(end - t, None if first is None else first - t, tokens, status == 200 and chunks > 0)


def request_sync(c, url: str, b: dict) -> Result:
    t = time.perf_counter()
    if not b.get("stream"):
        r = c.post(url, json=b)
        tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
        return Result(time.perf_counter() - t, None, tokens, r.status_code == 200)
    with c.stream("POST", url, json=b) as r:
        lines = [(time.perf_counter(), line) for line in r.iter_lines() if line]
    return _stream_result(t, r.status_code, lines)


async def request_async(c, url: str, b: dict) -> Result:
    t = time.perf_counter()
    if not b.get("stream"):
        r = await c.post(url, json=b)
        tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
        return Result(time.perf_counter() - t, None, tokens, r.status_code == 200)
    async with c.stream("POST", url, json=b) as r:
        lines = [(time.perf_counter(), line) async for line in r.aiter_lines() if line]
    return _stream_result(t, r.status_code, lines)


def sequential(url: str, model: str, n: int, max_tokens: int, direct=(), stream: bool = False
               ) -> tuple[float, list[Result], list[list[float]], int]:
    """One request at a time; each server call is paired with a call of every `direct` function on
    the same prompt, so all latencies are taken under the same machine load."""
    import httpx

    results, direct_lat, server_s = [], [[] for _ in direct], 0.0
    with httpx.Client(timeout=300) as c:
        for i in range(n):
            for f, lat in zip(direct, direct_lat, strict=True):
                t = time.perf_counter()
                f(i)
                lat.append(time.perf_counter() - t)
            results.append(request_sync(c, url, body(i, model, max_tokens, stream)))
            server_s += results[-1].latency
    return server_s, results, direct_lat, sum(not r.ok for r in results)


async def concurrent(urls, models, n: int, clients: int, max_tokens: int, stream: bool = False
                     ) -> tuple[float, list[Result], int]:
    """`clients` concurrent clients send `n` requests; request i goes to urls[i % len] for models[i % len]."""
    import httpx

    urls = [urls] if isinstance(urls, str) else urls
    models = [models] if isinstance(models, str) else models
    todo = iter(range(n))
    results: list[Result] = []
    errors = 0

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in todo:
            t = time.perf_counter()
            try:
                r = await request_async(c, urls[i % len(urls)], body(i, models[i % len(models)], max_tokens, stream))
                errors += not r.ok
            except (httpx.HTTPError, ValueError):
                errors += 1
                r = Result(time.perf_counter() - t, None, 0, False)
            results.append(r)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(c) for _ in range(clients)])
        return time.perf_counter() - t0, results, errors


SERVE: dict = {}  # `serve` settings every server child gets (`--prefix-cache-mb`)
DTYPES: dict[str, str] = {}  # chat completions URL -> the dtype its server's weights are in (the child reports it)


def start_server(model_dirs: list[str], max_batch: int, wait_ms: float, max_tokens: int, precision: str = "auto"
                 ) -> tuple[subprocess.Popen, str, str]:
    """A server child process on 127.0.0.1: (process, chat completions URL, served name)."""
    child = [sys.executable, __file__, "--child", str(max_batch), str(wait_ms), str(max_tokens), precision,
             json.dumps(SERVE), *map(str, model_dirs)]
    proc = subprocess.Popen(child, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().split()
    if len(line) != 3:
        proc.kill()
        raise SystemExit(f"server child did not start: {model_dirs}")
    url = f"http://127.0.0.1:{line[0]}/v1/chat/completions"
    DTYPES[url] = line[2]
    return proc, url, line[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def direct_caller(model_dir: Path, max_tokens: int):
    """The same generator the server runs, called in this process for one request."""
    from llamaduo.batcher import local_generator
    from llamaduo.config import InferConfig, ModelConfig
    from llamaduo.data import Message
    from llamaduo.infer import serving_threads
    from llamaduo.models import load_model

    model, tok = load_model(ModelConfig(base=str(model_dir)))
    serving_threads(model)  # as the server process does
    gen = local_generator(model, tok)
    sampling = InferConfig(temperature=0.0, max_new_tokens=max_tokens, num_samples=1, batch_size=1)

    def call(i: int) -> None:
        gen([(str(i), [Message(role="user", content=prompt(i))])], sampling, 0)

    call(0)  # warm-up
    return call


def engine_caller(model_dir: Path, max_tokens: int):
    """The server's own engine (`rowbatch.RowBatch`, no scheduler thread, no HTTP) for one request:
    the server's cost alone is its latency over this."""
    from llamaduo.chat_api import ChatRequest
    from llamaduo.config import InferConfig, ModelConfig
    from llamaduo.data import Message
    from llamaduo.infer import serving_threads
    from llamaduo.models import load_model
    from llamaduo.rowbatch import RowBatch

    model, tok = load_model(ModelConfig(base=str(model_dir)))
    serving_threads(model)
    batch = RowBatch(model, tok)
    sampling = InferConfig(temperature=0.0, max_new_tokens=max_tokens, num_samples=1)

    def call(i: int) -> None:
        batch.add(i, ChatRequest([Message(role="user", content=prompt(i))], sampling, 0, 1, False, False))
        while len(batch):
            batch.step()

    call(0)  # warm-up
    return call


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        max_batch, wait_ms, max_tokens, precision, serve, *model_dirs = sys.argv[2:]
        serve_child(model_dirs, int(max_batch), float(wait_ms), int(max_tokens), precision, json.loads(serve))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (built in a temp dir), 'gemma-270m' or a model directory")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 32 (tiny), 64 (gemma-270m)")
    ap.add_argument("--max-batch", type=int, default=None, help="server max_batch (default: --clients)")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--sequential", type=int, default=None, help="requests sent one at a time (default: --requests)")
    ap.add_argument("--stream", action="store_true", help="every request streams; adds first-token times")
    ap.add_argument("--adapters", type=int, default=None, help="N LoRA adapters in one process vs N processes")
    ap.add_argument("--against", choices=["llamacpp"], default=None, help="compare with llama.cpp's server")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8", "int8-int4head"], default=None,
                    help="the served run's infer.precision (what its judged answers were generated in; "
                    "int8-int4head: int8 with infer.int4_lm_head); default auto, and int8-int4head against "
                    "llama.cpp, whose side runs the GGUF's 4-5-bit layers and 8-bit LM head")
    ap.add_argument("--prefix-cache-mb", type=float, default=None,
                    help="the servers' serve.prefix_cache_mb (default: its default; 0 = off)")
    args = ap.parse_args()
    if args.prefix_cache_mb is not None:
        import serve_load  # this file runs as __main__; the comparisons' `start_server` is this module's

        SERVE["prefix_cache_mb"] = serve_load.SERVE["prefix_cache_mb"] = args.prefix_cache_mb
    args.precision = args.precision or ("int8-int4head" if args.against == "llamacpp" else "auto")
    args.max_tokens = args.max_tokens or (64 if args.model == "gemma-270m" else 32)
    if args.adapters:
        from serve_adapters import run_adapters

        return run_adapters(args)
    if args.against == "llamacpp":
        from serve_vs_llamacpp import run_against_llamacpp

        return run_against_llamacpp(args)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            from llamaduo.demo.tiny import build_tiny_model

            model_dir = build_tiny_model(Path(tmp) / "tiny")
        else:
            model_dir = Path(args.model)
        proc, url, name = start_server([str(model_dir)], args.max_batch or args.clients, args.batch_wait_ms,
                                       args.max_tokens)
        try:
            n_seq = args.sequential or args.requests
            direct = (direct_caller(model_dir, args.max_tokens), engine_caller(model_dir, args.max_tokens))
            sequential(url, name, 8, args.max_tokens, stream=args.stream)  # warm-up
            asyncio.run(concurrent(url, name, args.clients, args.clients, args.max_tokens, args.stream))
            seq_s, seq_res, (direct_lat, engine_lat), seq_err = sequential(url, name, n_seq, args.max_tokens, direct,
                                                                           args.stream)
            con_s, con_res, con_err = asyncio.run(concurrent(url, name, args.requests, args.clients, args.max_tokens,
                                                             args.stream))
        finally:
            proc.terminate()
            proc.wait(10)

    seq_lat, con_lat = [r.latency for r in seq_res], [r.latency for r in con_res]
    seq_rps, con_rps = n_seq / seq_s, args.requests / con_s
    p50_server, p50_direct = statistics.median(seq_lat), statistics.median(direct_lat)
    speedup = con_rps / seq_rps
    overhead = 100.0 * (p50_server - p50_direct) / p50_direct
    errors = seq_err + con_err
    print(f"model {args.model}, max_tokens {args.max_tokens}, max_batch {args.max_batch or args.clients}, "
          f"batch_wait_ms {args.batch_wait_ms:g}, stream {args.stream}")
    print(f"{'phase':<28}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'ttft p50':>9}")
    for label, n, rps, res in (
        ("sequential (1 client)", n_seq, seq_rps, seq_res),
        (f"concurrent ({args.clients} clients)", args.requests, con_rps, con_res),
        ("direct generate (no server)", len(direct_lat), len(direct_lat) / sum(direct_lat),
         [Result(x, None, 0, True) for x in direct_lat]),
        ("direct row batch (no server)", len(engine_lat), len(engine_lat) / sum(engine_lat),
         [Result(x, None, 0, True) for x in engine_lat]),
    ):
        lat = [r.latency for r in res]
        q = statistics.quantiles(lat, n=20)
        ttft = [r.ttft for r in res if r.ttft is not None]
        shown = f"{1000 * p50(ttft):>9.1f}" if ttft else f"{'n/a':>9}"
        print(f"{label:<28}{n:>9}{rps:>9.1f}{1000 * statistics.median(lat):>9.1f}{1000 * q[18]:>9.1f}{shown}")
    p50_engine = statistics.median(engine_lat)
    print(f"server p50 over its own engine's (row batch, no HTTP, no threads): "
          f"{100.0 * (p50_server - p50_engine) / p50_engine:+.1f} %; the engine's over direct generate: "
          f"{100.0 * (p50_engine - p50_direct) / p50_direct:+.1f} %")
    if args.stream:
        ttft = [r.ttft for r in con_res if r.ttft is not None]
        ttft_p50 = p50(ttft)
        print(f"concurrency_speedup={speedup:.2f} p50_overhead_pct={overhead:.1f} ttft_p50_ms={1000 * ttft_p50:.1f} "
              f"ttft_ratio={ttft_p50 / statistics.median(con_lat):.3f} errors={errors}")
    else:
        print(f"concurrency_speedup={speedup:.2f} p50_overhead_pct={overhead:.1f} errors={errors}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
