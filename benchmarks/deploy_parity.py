"""Ship what you measured: the demo task's best round, exported and judged through llama.cpp.

    python benchmarks/deploy_parity.py --model gemma-270m      # the full demo (Gemma 3 270M), minutes to hours on 2 cores
    python benchmarks/deploy_parity.py --model tiny-llama      # a tiny SentencePiece Llama trained like `demo --quick`
    python benchmarks/deploy_parity.py --run-dir runs/demo     # a finished demo run

Runs the demo loop (simulated service LLM; skipped with --run-dir), deploys the best round (merged
HF + f16 + q8_0 + q4_k_m GGUF), then `accept --runtime llamacpp --artifact all`: each artifact
answers the test split and is judged with the run's protocol; the merged model is served by
`llamaduo serve` (the baseline), each GGUF by llama.cpp's server. The last line is

    f16_identical=<rate> q8_0_identical=<rate> q4_k_m_identical=<rate> q4_k_m_score_drop=<points>
    llamacpp_speedup=<llama.cpp q4_k_m tok/s ÷ llamaduo serve tok/s, one client> rss_ratio=<llama.cpp ÷ llamaduo serve>

(on one line); identical = greedy answers equal to the round's own (the merged model's greedy answers
when the round sampled). A figure that could not be measured prints as n/a.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def train_demo(model: str, out: Path) -> Path:
    from llamaduo import loop
    from llamaduo.demo import run as demo
    from llamaduo.demo.simulator import SimulatedService
    from llamaduo.demo.task import simulator_responder
    from llamaduo.store import RunStore

    quick = model == "tiny-llama"
    if quick:
        from llamaduo.demo.tiny_spm import build_tiny_spm_model

        student = {"base": str(build_tiny_spm_model(out.parent / "tiny-llama-base", "llama")), "dtype": "float32"}
    else:
        student = demo.prepare_student(False, demo.cache_dir())
    with SimulatedService(simulator_responder) as sim:
        cfg = demo.demo_config(out, sim.base_url, student, quick)
        cfg.deploy.formats = ["hf", "gguf", "ollama"]
        if quick:  # a 400-piece SentencePiece vocabulary spends about one token per 2-3 characters
            cfg.train.max_length = 640
        loop.run(cfg, fresh=True, display="quiet")
    RunStore(out).update_manifest(simulated_service=True)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def measure(run_dir: Path) -> dict[str, float | None]:
    from llamaduo import deploy
    from llamaduo.config_file import load_config
    from llamaduo.demo.simulator import SimulatedService
    from llamaduo.demo.task import simulator_responder
    from llamaduo.parity import run_parity
    from llamaduo.service import ServiceClient
    from llamaduo.store import RunStore

    store = RunStore(run_dir)
    cfg = load_config(store.config_path).model_copy(update={"runs_dir": run_dir.parent, "name": run_dir.name})
    cfg.deploy.formats = ["hf", "gguf", "ollama"]
    t = time.monotonic()
    dep = deploy.deploy(cfg, store)
    print(f"deploy: {time.monotonic() - t:.0f}s; written {sorted(dep.gguf)}; failed {dep.failed}", flush=True)
    with SimulatedService(simulator_responder) as sim:
        judged = cfg.model_copy(update={"service": cfg.service.model_copy(update={"base_url": sim.base_url})})
        client = ServiceClient(judged.service, db_path=store.service_db)
        try:
            parity = run_parity(judged, store, client, artifact="all")
        finally:
            client.close()
    print("\n".join(deploy.acceptance_text(parity)), flush=True)
    rows = {r.artifact: r for r in parity.rows}

    def get(name: str, field: str) -> float | None:
        row = rows.get(name)
        return getattr(row, field) if row is not None else None

    q4, merged = rows.get("q4_k_m"), rows.get("merged")
    return {
        "f16_identical": get("f16", "identical"),
        "q8_0_identical": get("q8_0", "identical"),
        "q4_k_m_identical": get("q4_k_m", "identical"),
        "q4_k_m_score_drop": -q4.difference if q4 is not None and q4.difference is not None else None,
        "llamacpp_speedup": _ratio(get("q4_k_m", "tokens_per_s"), get("merged", "tokens_per_s")),
        "rss_ratio": _ratio(q4.peak_rss_mb if q4 else None, merged.peak_rss_mb if merged else None),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["gemma-270m", "tiny-llama"], default="gemma-270m")
    ap.add_argument("--run-dir", type=Path, help="A finished demo run to measure (skips training).")
    ap.add_argument("--out", type=Path, default=Path("runs") / "bench-deploy-parity")
    args = ap.parse_args()
    t = time.monotonic()
    run_dir = args.run_dir or train_demo(args.model, (args.out / args.model).absolute())
    print(f"run: {run_dir} ({time.monotonic() - t:.0f}s)", flush=True)
    figures = measure(run_dir)
    print(" ".join(f"{k}={'n/a' if v is None else f'{v:.2f}'}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
