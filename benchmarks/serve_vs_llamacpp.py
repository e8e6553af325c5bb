"""`serve_load.py --against llamacpp`: `llamaduo serve` vs llama.cpp's OpenAI-compatible server.

    python benchmarks/serve_load.py --model gemma-270m --clients 8 --requests 32 --stream --against llamacpp

Both serve the packaged Gemma 3 270M (llama.cpp the Q4_K_M GGUF itself, llamaduo its dequantised
weights, by default as `infer.precision: int8` with `infer.int4_lm_head` — int8 layers and a 4-bit
LM head against the GGUF's 4-5-bit layers and 8-bit head; `--precision` picks another), on the same 127.0.0.1, with the same prompts, greedy, streamed:
  1. one client, a few requests one after another (single-stream tok/s, first-token time),
  2. `--clients` concurrent clients, `--requests` requests (aggregate tok/s, first-token p50).
Both servers are up throughout and measured in turn, phase by phase (ours, llama.cpp, ours,
llama.cpp), the idle one waiting, so the host's drifting speed reaches both sides alike.
Tokens are the streams' reported usage (content chunks where a server reports none). llama.cpp is
asked through its `/v1/completions` with the very prompt text our chat template renders (its chat
endpoint answers this pretrained base with an empty turn). The last line is exactly:

    aggregate_ratio=<ours ÷ llama.cpp's best aggregate tok/s> single_ratio=<ours ÷ llama.cpp, one client>
    ttft_p50_ms=<ours, N clients> errors=<n>
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import serve_load
from serve_load import concurrent, p50, sequential, start_server

SINGLE = 4  # one-client requests per server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llamacpp(gguf: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(threads), "--n_ctx", "2048"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1/completions"
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("llama.cpp server exited at start")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("llama.cpp server did not start")


def measure(servers: list[tuple[str, str, object]], args) -> list[dict]:
    """Each server's one-client and concurrent figures. Both servers are up (the one not measured
    sits idle) and their phases alternate — one client on each, then the clients on each — so a
    change in the host's speed between phases reaches both sides alike."""
    for url, name, render in servers:  # warm-up
        serve_load.RENDER = render
        sequential(url, name, 1, args.max_tokens, stream=True)
    out = [{} for _ in servers]
    for phase in ("single", "concurrent"):
        for (url, name, render), m in zip(servers, out, strict=True):
            serve_load.RENDER = render
            if phase == "single":
                seq_s, seq_res, _, m["errors"] = sequential(url, name, SINGLE, args.max_tokens, stream=True)
                m["single_tps"] = sum(r.tokens for r in seq_res) / seq_s
                m["single_ttft"] = p50([r.ttft for r in seq_res if r.ttft is not None])
                continue
            con_s, con_res, con_err = asyncio.run(concurrent(url, name, args.requests, args.clients, args.max_tokens,
                                                             True))
            got = [r for r in con_res if r.ttft is not None]
            m.update(agg_tps=sum(r.tokens for r in con_res) / con_s, ttft=p50([r.ttft for r in got]),
                     with_tokens=len(got), errors=m["errors"] + con_err)
    serve_load.RENDER = None
    return out


def run_against_llamacpp(args) -> int:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit('--against llamacpp needs llama-cpp-python: pip install "llama-cpp-python[server]"') from None
    from llamaduo import models
    from llamaduo.config import ModelConfig
    from llamaduo.demo.run import cache_dir, prepare_student

    if args.model != "gemma-270m":
        raise SystemExit("--against llamacpp runs on the packaged GGUF: use --model gemma-270m")
    student = prepare_student(False, cache_dir())
    gguf = Path(student["base"])
    hf_dir = Path(models.resolve_base(ModelConfig(**student)))  # the dequantised copy, cached
    threads = os.cpu_count() or 2
    proc, url, name = start_server([str(hf_dir)], args.max_batch or args.clients, args.batch_wait_ms, args.max_tokens,
                                   args.precision)
    dtype = serve_load.DTYPES[url]
    try:
        theirs_proc, theirs_url = start_llamacpp(gguf, threads)
        try:
            # The same prompt text both servers decode from: ours renders it from the chat messages.
            tokenizer, _ = models.load_tokenizer(ModelConfig(base=str(hf_dir)))

            def render(text: str) -> str:
                return models.render_prompt(tokenizer, [{"role": "user", "content": text}])

            ours, theirs = measure([(url, name, None), (theirs_url, "gemma", render)], args)
        finally:
            theirs_proc.terminate()
            theirs_proc.wait(10)
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"Gemma 3 270M, {args.requests} requests from {args.clients} clients (+{SINGLE} from one), "
          f"max_tokens {args.max_tokens}, greedy, streamed; llamaduo weights {dtype} (infer.precision "
          f"{args.precision}), llama.cpp Q4_K_M n_threads={threads}")
    print(f"{'server':<12}{'1-client tok/s':>16}{'1-client ttft ms':>18}{'aggregate tok/s':>17}{'ttft p50 ms':>13}"
          f"{'got tokens':>12}")
    for label, m in (("llamaduo", ours), ("llama.cpp", theirs)):
        print(f"{label:<12}{m['single_tps']:>16.1f}{1000 * m['single_ttft']:>18.0f}{m['agg_tps']:>17.1f}"
              f"{1000 * m['ttft']:>13.0f}{m['with_tokens']:>9}/{args.requests}")
    best = max(theirs["agg_tps"], theirs["single_tps"])
    errors = ours["errors"]  # llama.cpp's requests that got no tokens show in its row
    def ratio(a: float, b: float) -> str:  # llama.cpp streaming no tokens at all is no ratio: n/a
        return f"{a / b:.2f}" if b > 0 else "n/a"

    print(f"aggregate_ratio={ratio(ours['agg_tps'], best)} single_ratio={ratio(ours['single_tps'], theirs['single_tps'])} "
          f"ttft_p50_ms={1000 * ours['ttft']:.0f} errors={errors}")
    return 0 if errors == 0 else 1
