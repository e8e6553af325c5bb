"""Grammar-constrained decoding against free decoding: the same prompts through the same decode loop.

    python benchmarks/constrained_decode.py --model tiny
    python benchmarks/constrained_decode.py --model gemma-270m

The prompts are the demo task's (extract an order from a customer message as JSON). Both arms run
`infer.generate` as `llamaduo serve` does, batched, at the same sampling settings; the constrained
arm gives every row a fresh constraint of the order's `json_schema` (strict), compiled once by
`grammar.Grammars` before timing (its compile time is printed on its own). The arms alternate
`--repeats` times. Throughput is generated tokens (up to each row's end) per second of this
process's CPU time (threads included): on a machine shared with other work, wall-clock seconds
swing with the neighbours' load, CPU seconds much less; wall-clock figures are printed beside.
The constrained answers are validated against the schema with jsonschema.
The tiny model is untrained: its free text never ends before the budget, while its constrained
answers end once the budget rule closes the JSON. Last line:

    throughput_ratio=<constrained ÷ unconstrained tok/s> schema_valid=<rate>
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import model_dir  # noqa: E402

from llamaduo.config import InferConfig, ModelConfig  # noqa: E402
from llamaduo.data import Message  # noqa: E402

ORDER = {
    "type": "object",
    "properties": {
        "intent": {"type": "string", "enum": ["order", "cancel", "return"]},
        "name": {"type": "string"},
        "city": {"type": "string"},
        "item": {"type": "string"},
        "quantity": {"type": "integer"},
    },
    "required": ["intent", "name", "city", "item", "quantity"],
    "additionalProperties": False,
}
DEMO = ROOT / "src" / "llamaduo" / "demo" / "data" / "orders.jsonl"


def prompts(n: int) -> list[tuple[str, list[Message]]]:
    rows = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["id"], [Message(role="user", content=r["prompt"])]) for r in rows[:n]]


def valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), ORDER)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "gemma-270m"], default="tiny")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--samples", type=int, default=1, help="K samples per prompt")
    ap.add_argument("--temperature", type=float, default=InferConfig().temperature)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each arm")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from llamaduo.grammar import Grammars, GrammarSpec, canonical
    from llamaduo.infer import for_generation, generate
    from llamaduo.models import load_model

    console = Console(stderr=True, width=120)
    with tempfile.TemporaryDirectory(prefix="llamaduo-constrained-bench-") as tmp:
        base = model_dir(args.model, Path(tmp))
        cfg = InferConfig(num_samples=args.samples, temperature=args.temperature, max_new_tokens=args.new_tokens,
                          batch_size=args.prompts)
        model, tok = load_model(ModelConfig(base=str(base), dtype="float32"))
        model = for_generation(model, cfg)
        batch = prompts(args.prompts)
        grammars = Grammars(tok)
        spec = GrammarSpec(schema=canonical(ORDER), strict=True)
        t0 = time.monotonic()
        factory = grammars.factory(spec, cfg.max_new_tokens)
        compile_s = time.monotonic() - t0
        console.print(f"{args.model}: {len(batch)} prompts, K={cfg.num_samples}, T={cfg.temperature}, "
                      f"{cfg.max_new_tokens} new tokens; schema compiled in {compile_s * 1000:.0f} ms")
        generate(model, tok, batch[:2], cfg)  # warm-up: first-call costs out of both arms
        generate(model, tok, batch[:2], cfg, constraints=[factory] * 2)
        totals = {"free": [0, 0.0, 0.0], "json_schema": [0, 0.0, 0.0]}  # tokens, CPU seconds, wall seconds
        answers = []
        for r in range(args.repeats):
            for arm in ("free", "json_schema"):
                constraints = [factory] * len(batch) if arm == "json_schema" else None
                c0, t0 = time.process_time(), time.monotonic()
                outs = generate(model, tok, batch, cfg, seed=r, constraints=constraints)
                totals[arm][1] += time.process_time() - c0
                totals[arm][2] += time.monotonic() - t0
                totals[arm][0] += sum(c.new_tokens for c in outs)
                if arm == "json_schema":
                    answers += outs
    rates = {arm: tokens / cpu for arm, (tokens, cpu, _) in totals.items()}
    wall = {arm: tokens / seconds for arm, (tokens, _, seconds) in totals.items()}
    ok = sum(valid(c.text) for c in answers)
    table = Table(title=f"constrained decoding: {args.model}, {len(batch)} prompts × {args.repeats}")
    for col in ("arm", "new tokens", "CPU s", "tokens/CPU s", "wall s", "tokens/wall s", "schema-valid"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm, (tokens, cpu, seconds) in totals.items():
        vcell = f"{ok}/{len(answers)}" if arm == "json_schema" else "n/a"
        table.add_row(arm, str(tokens), f"{cpu:.1f}", f"{rates[arm]:.1f}", f"{seconds:.1f}", f"{wall[arm]:.1f}", vcell)
    console.print(table)
    finishes = {}
    for c in answers:
        finishes[c.finish_reason] = finishes.get(c.finish_reason, 0) + 1
    console.print(f"constrained finish reasons: {finishes}; example: {answers[0].text[:160]!r}")
    console.print(f"wall-clock ratio: {wall['json_schema'] / wall['free']:.2f}")
    print(f"throughput_ratio={rates['json_schema'] / rates['free']:.2f} schema_valid={ok / len(answers):.2f}")


if __name__ == "__main__":
    main()
