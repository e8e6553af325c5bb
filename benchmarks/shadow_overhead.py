"""What shadow evaluation costs the client: `serve --shadow 1.0` against the same server without it.

    python benchmarks/shadow_overhead.py --model tiny --clients 32 --requests 256

Three processes on 127.0.0.1: a loopback service LLM (the simulator: it answers and judges),
and two servers of the same deployed run, one plain and one shadowing every request (its
worker sends each to the service, stores the pair and judges it with `--judgments` judge calls).
The `--requests` are sent from `--clients` concurrent clients to each server in alternating
slices, the shadow server's queue drained before the plain one's next slice so its background
work never lands on the other's measurement. The last line is exactly:

    p50_overhead_pct=<p> p99_overhead_pct=<p> shadow_judged=<n> errors=<n>

overhead = (shadowed − plain) ÷ plain client latency at that percentile; errors = non-200
responses plus shadowed requests that were not judged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = [
    "Hello, this is Ana Costa in Porto. Please send me 2 desk lamps.",
    "Cancel my order of one blue mug.",
    "Summarize: the meeting moved to Friday at 10, bring the budget draft.",
    "Classify the sentiment: the kettle arrived broken and support never answered.",
    "I would like to return the yoga mat I bought last week, it is too thin.",
]


def service_child() -> None:
    """The service LLM: judges with a fixed verdict, answers with a fixed text; prints its URL."""
    from llamaduo.demo.simulator import SimulatedService

    def respond(req: dict) -> str:
        text = "\n".join(m.get("content", "") for m in req.get("messages", []))
        if "<candidate>" in text:
            return json.dumps({"similarity": {"score": 60, "reason": "close"}, "precision": {"score": 55, "reason": "ok"}})
        return '{"item": "desk lamp", "quantity": 2}'

    svc = SimulatedService(respond).start()
    print(svc.base_url, flush=True)
    while True:
        time.sleep(3600)


def serve_child(run_dir: str) -> None:
    """A server of the run (its config decides shadowing); prints `PORT NAME` once listening."""
    from llamaduo.config_file import load_config
    from llamaduo.serve import BackgroundServer, build_app
    from llamaduo.store import RunStore

    cfg = load_config(RunStore(run_dir).config_path, [])
    app, name = build_app(Path(run_dir), cfg)
    srv = BackgroundServer(app, "127.0.0.1", 0, name).start()
    print(srv.port, name, flush=True)
    srv.thread.join()


def make_run(root: Path, name: str, model_dir: Path, service_url: str, args, rate: float) -> Path:
    from llamaduo.config import dump_config, from_dict
    from llamaduo.store import RunStore

    cfg = from_dict({
        "name": name, "runs_dir": str(root),
        "service": {"base_url": service_url, "model": "sim", "api_key_env": "LLAMADUO_BENCH_KEY",
                    "concurrency": 16, "prices": {"sim": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}},
        "judge": {"judgments_per_candidate": args.judgments, "temperature": 0.7},
        "infer": {"temperature": 0.0, "max_new_tokens": args.max_tokens, "num_samples": 1},
        "serve": {"max_batch": args.clients, "batch_wait_ms": 10.0, "shadow_rate": rate, "monitor_window": 32},
    })
    store = RunStore(cfg.run_dir)
    store.init_manifest(0)
    store.config_path.write_text(dump_config(cfg))
    shutil.copytree(model_dir, store.merged_dir)
    return cfg.run_dir


def start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc, proc.stdout.readline().strip()


async def load(url: str, model: str, first: int, n: int, clients: int, max_tokens: int) -> tuple[list[float], int]:
    import httpx

    todo = iter(range(first, first + n))
    lat: list[float] = []
    errors = 0

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in todo:
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"}]}
            t = time.perf_counter()
            try:
                r = await c.post(url, json=body)
                errors += r.status_code != 200
            except httpx.HTTPError:
                errors += 1
            lat.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        await asyncio.gather(*[worker(c) for _ in range(clients)])
    return lat, errors


def shadow_counts(base: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in fam.samples:
            if s.name == "llamaduo_shadow_requests_total":
                out[s.labels["outcome"]] = s.value
            elif s.name in ("llamaduo_shadow_queue", "llamaduo_shadow_dropped_total"):
                out[s.name + s.labels.get("reason", "")] = s.value
    return out


def drain(base: str, timeout_s: float = 600.0) -> dict[str, float]:
    """Wait until the shadow server has judged (or failed) everything it sampled."""
    deadline = time.monotonic() + timeout_s
    while True:
        c = shadow_counts(base)
        done = c.get("judged", 0) + c.get("unjudged", 0) + c.get("failed", 0)
        if (done >= c.get("sampled", 0) and c.get("llamaduo_shadow_queue", 0) == 0) or time.monotonic() > deadline:
            return c
        time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    if sys.argv[1:2] == ["--service-child"]:
        service_child()
        return 0
    if sys.argv[1:2] == ["--child"]:
        serve_child(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (built in a temp dir) or a model directory")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256, help="requests sent to each server")
    ap.add_argument("--slices", type=int, default=8, help="alternating slices the requests are sent in (load drifts)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--judgments", type=int, default=2, help="judge calls per shadowed request (judge M)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model == "tiny":
            from llamaduo.demo.tiny import build_tiny_model

            model_dir = build_tiny_model(root / "tiny")
        else:
            model_dir = Path(args.model)
        procs = []
        try:
            svc, service_url = start([sys.executable, __file__, "--service-child"])
            procs.append(svc)
            urls = {}
            for label, rate in (("plain", 0.0), ("shadow", 1.0)):
                run_dir = make_run(root / "runs", f"bench-{label}", model_dir, service_url, args, rate)
                proc, line = start([sys.executable, __file__, "--child", str(run_dir)])
                procs.append(proc)
                port, name = line.split()
                urls[label] = (f"http://127.0.0.1:{port}", name)
            for base, name in urls.values():  # warm-up, not measured
                asyncio.run(load(f"{base}/v1/chat/completions", name, 10_000, args.clients, args.clients, args.max_tokens))
            drain(urls["shadow"][0])
            lat: dict[str, list[float]] = {"plain": [], "shadow": []}
            errors, drain_s = 0, 0.0
            size = args.requests // args.slices
            for s in range(args.slices):
                for label in (("plain", "shadow") if s % 2 == 0 else ("shadow", "plain")):
                    base, name = urls[label]
                    got, err = asyncio.run(load(f"{base}/v1/chat/completions", name, s * size, size, args.clients,
                                                args.max_tokens))
                    lat[label] += got
                    errors += err
                    if label == "shadow":
                        t = time.perf_counter()
                        counts = drain(base)
                        drain_s += time.perf_counter() - t
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    sampled = int(counts.get("sampled", 0)) - args.clients  # the warm-up's requests were shadowed too
    judged = int(counts.get("judged", 0)) - args.clients
    errors += sampled - judged + int(sum(v for k, v in counts.items() if k.startswith("llamaduo_shadow_dropped")))
    print(f"model {args.model}, clients {args.clients}, requests {args.requests} per server in {args.slices} slices, "
          f"max_tokens {args.max_tokens}, judge calls per shadowed request {args.judgments}")
    print(f"{'server':<22}{'requests':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    for label in ("plain", "shadow"):
        v = lat[label]
        print(f"{label + (' (--shadow 1.0)' if label == 'shadow' else ''):<22}{len(v):>9}"
              f"{1000 * statistics.median(v):>9.1f}{1000 * pct(v, 90):>9.1f}{1000 * pct(v, 99):>9.1f}")
    print(f"shadow work finished {drain_s:.1f} s after its slices' last responses (it waits for idle time)")
    p50 = 100.0 * (statistics.median(lat["shadow"]) - statistics.median(lat["plain"])) / statistics.median(lat["plain"])
    p99 = 100.0 * (pct(lat["shadow"], 99) - pct(lat["plain"], 99)) / pct(lat["plain"], 99)
    print(f"p50_overhead_pct={p50:.1f} p99_overhead_pct={p99:.1f} shadow_judged={judged} errors={errors}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
