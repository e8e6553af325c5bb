"""Export the migrated model.

`deploy` merges the best round's adapter into the base and writes, under `deploy/`:
- `merged/`: a plain Hugging Face model dir with tokenizer, chat template and a model card
  (`README.md`: base model, data lineage and counts, judge statistics, migration cost);
- `model-<kind>.gguf`: the unquantized GGUF from llama.cpp's converter (`deploy.gguf_type`, f16 by
  default) and each of `deploy.quantize` (q8_0, q4_k_m) from llama.cpp's quantizer (`gguf.py`);
- `Modelfile` for Ollama (`modelfile.py`), FROM the shipped GGUF;
- `manifest.json` (`artifacts.DeployManifest`): each requested artifact, ok or failed with why.

A requested format that fails does not stop the others; `DeployResult.failed` lists it and the
CLI exits non-zero. What is served from the export is checked by `accept.py`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llamaduo.artifacts import METRICS, DeployManifest, LedgerRow
from llamaduo.config import Config, ModelConfig
from llamaduo.data import load_examples
from llamaduo.errors import UserError
from llamaduo.files import atomic_write_bytes, atomic_write_text, read_model, write_json
from llamaduo.gguf_export import export_ggufs, sentencepiece_model, ship_kind
from llamaduo.hashing import hash_dir, hash_obj
from llamaduo.modelfile import chat_wrappers, modelfile, run_stops, sampling_parameters
from llamaduo.store import RunStore


class DeployResult(BaseModel):
    round: int
    merged_dir: Path
    model_card: Path
    modelfile: Path | None = None
    gguf: dict[str, Path] = {}  # kind → file, for those written
    adapters: dict[str, Path] = {}  # kind → the GGUF LoRA applied over its file (a quantized base + the round)
    failed: list[str] = []  # one line per requested format that failed
    stops: list[str] = []
    manifest: Path | None = None
    seconds: float = 0.0
    shipped: str | None = None  # the GGUF kind the Modelfile points at and the gate judges
    warnings: list[str] = []

    @property
    def notes(self) -> list[str]:
        """What the user should know about the export (e.g. why a GGUF is missing, why another ships)."""
        return list(self.failed) + list(self.warnings)


# ----------------------------------------------------------------------- deploy
def pick_round(store: RunStore, round: int | None) -> int:
    if round is not None:
        return round
    best = store.read_manifest().best_round
    if best is not None:
        return best
    rounds = [r for r in store.rounds() if store.adapter_dir(r).exists()]
    if not rounds:
        raise UserError(f"{store.root}: no trained round to deploy (run `llamaduo run` or `llamaduo train` first)")
    return rounds[-1]


def load_trained(cfg: Config, adapter: Path) -> tuple[Any, Any]:
    """The round's model with its weights folded in: LoRA merged, or a full fine-tune as saved."""
    from llamaduo import models

    if (adapter / "adapter_config.json").exists():
        model, tokenizer = models.load_model(cfg.model, adapter=adapter)
        return models.merge_adapter(model), tokenizer
    if (adapter / "config.json").exists():  # method=full saves a whole model
        mcfg = ModelConfig(base=str(adapter), dtype=cfg.model.dtype, chat_template=cfg.model.chat_template)
        return models.load_model(mcfg)
    raise UserError(f"{adapter}: neither a LoRA adapter nor a model (no adapter_config.json / config.json)")


def read_deploy_manifest(store: RunStore) -> DeployManifest:
    return read_model(store.deploy_manifest_path, DeployManifest, f"rerun `llamaduo deploy {store.root}`")


def num_ctx(cfg: Config, model_config: Any) -> int:
    """The served context: what training saw plus the longest answer, within the model's positions."""
    if cfg.deploy.num_ctx:
        return cfg.deploy.num_ctx
    want = cfg.train.max_length + cfg.infer.max_new_tokens
    limit = getattr(model_config, "max_position_embeddings", None)
    return min(want, limit) if limit else want


def deploy(cfg: Config, store: RunStore, round: int | None = None) -> DeployResult:
    """Merge the best (or the given) round and export it as configured in `cfg.deploy`."""
    t0 = time.monotonic()
    r = pick_round(store, round)
    adapter = store.adapter_dir(r)
    if not adapter.exists():
        raise UserError(f"{adapter}: round {r} has no trained adapter")
    model, tokenizer = load_trained(cfg, adapter)
    formats = cfg.deploy.formats
    spm = sentencepiece_model(cfg, adapter) if "gguf" in formats else None

    # Write into a temporary sibling and swap it in, so a failed export never leaves half a model.
    tmp = store.staging_dir(store.merged_dir)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if spm is not None and not (tmp / "tokenizer.model").exists():
            atomic_write_bytes(tmp / "tokenizer.model", spm)  # what llama.cpp's converter reads directly
        atomic_write_text(tmp / store.model_card_path.name, model_card(cfg, store, r))
        store.replace_dir(tmp, store.merged_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = DeployResult(round=r, merged_dir=store.merged_dir, model_card=store.model_card_path)
    manifest = DeployManifest(round=r, at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), formats=list(formats), merged=store.merged_dir.name)

    if "gguf" in formats:
        manifest.gguf, manifest.converter = export_ggufs(cfg, store, adapter)
        manifest.failed = [f"gguf {g.kind}: {g.error}" for g in manifest.gguf if g.status == "failed"]
        result.gguf = {g.kind: store.deploy_dir / g.file for g in manifest.gguf if g.status == "ok" and g.file}
        result.adapters = {g.kind: store.deploy_dir / g.adapter for g in manifest.gguf if g.status == "ok" and g.adapter}
    wrappers = chat_wrappers(tokenizer)
    result.stops = run_stops(tokenizer, wrappers, cfg)
    over = next((g.kind for g in manifest.gguf if g.adapter and g.status == "ok"), None)
    shipped, warning = ship_kind(cfg, over)
    manifest.shipped = shipped if shipped in result.gguf else None
    if warning is not None:
        manifest.warnings.append(warning)
    if "ollama" in formats:
        kind = shipped if shipped in result.gguf else next(iter(result.gguf), None)
        source = "./" + (result.gguf[kind].name if kind else store.merged_dir.name)
        top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
        params = sampling_parameters(cfg, num_ctx(cfg, model.config), top_k)
        entry = manifest.file(kind) if kind else None
        lora = "./" + entry.adapter if entry is not None and entry.adapter else None
        atomic_write_text(store.modelfile_path, modelfile(source, wrappers, result.stops, cfg, params, lora))
        result.modelfile = store.modelfile_path
        manifest.modelfile, manifest.modelfile_from, manifest.shipped = store.modelfile_path.name, source, kind
    write_json(store.deploy_manifest_path, manifest.model_dump(mode="json", exclude_none=True))
    result.failed, result.manifest = manifest.failed, store.deploy_manifest_path
    result.shipped, result.warnings = manifest.shipped, manifest.warnings
    result.seconds = time.monotonic() - t0
    store.mark_stage(
        "deploy",
        "done" if not manifest.failed else "failed",
        inputs_hash=hash_obj({"adapter": hash_dir(adapter), "deploy": cfg.deploy.model_dump(mode="json")}),
        round=r,
        gguf=bool(result.gguf),
        gguf_message=manifest.failed[0] if manifest.failed else None,
        seconds=round_s(result.seconds),
    )
    return result


def round_s(seconds: float) -> float:
    return float(f"{seconds:.1f}")


# ---------------------------------------------------------------------- model card
def _base_name(base: str) -> str:
    """The base model as a name: a Hub id as is, a local path by its last component only."""
    p = Path(base)
    return p.name if p.is_absolute() or p.exists() else base


def _fmt(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) else "n/a"


def model_card(cfg: Config, store: RunStore, r: int) -> str:
    m = store.read_manifest()
    base = _base_name(cfg.model.base) or "unknown"
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "tags: [llamaduo, fine-tuned]",
        "---",
        f"# {cfg.name}",
        "",
        f"`{base}` fine-tuned by llamaduo (round r{r:02d}, method {cfg.train.method}) to take over a task from "
        f"the service LLM `{cfg.service.model}`.",
        "",
        "## Data",
        "",
        "| source | examples |",
        "|---|---|",
    ]
    train = load_examples(store.train_path) if store.train_path.exists() else None
    counts = {
        "coverage train": len(train) if train is not None else None,
        "coverage test (held out)": len(load_examples(store.test_path)) if store.test_path.exists() else None,
    }
    for k in range(1, r + 1):
        p = store.synthetic_path(k)
        if p.exists():
            counts[f"synthetic, round {k} (after dedup + decontamination)"] = len(load_examples(p))
    lines += [f"| {k} | {v if v is not None else 'n/a'} |" for k, v in counts.items()]
    if train is not None:
        cats: dict[str, int] = {}
        for ex in train:
            cats[ex.category] = cats.get(ex.category, 0) + 1
        lines += ["", "Categories in the coverage train split: " + ", ".join(f"{c} {n}" for c, n in sorted(cats.items()))]
    lines += ["", "## Evaluation (LLM-as-judge on the held-out test split)", ""]
    if store.scores_path(r).exists():
        scores = store.read_scores(r)
        lines += [
            f"Judge `{cfg.judge_model}`; {cfg.infer.num_samples} candidates per prompt, each judged "
            f"{cfg.judge.judgments_per_candidate}×; scores 1-100, coverage = % of candidates at or above.",
            "",
            "| metric | mean | median | coverage@50 | coverage@70 | 95% CI of mean |",
            "|---|---|---|---|---|---|",
        ]
        for metric in METRICS:
            st = scores.metric(metric)
            ci_txt = f"{_fmt(st.ci[0])}–{_fmt(st.ci[1])}" if st.ci else "n/a"
            lines.append(
                f"| {metric} | {_fmt(st.mean)} | {_fmt(st.median)} | {_fmt(st.coverage_50)} "
                f"| {_fmt(st.coverage_70)} | {ci_txt} |"
            )
        c = scores.counts
        if any(scores.metric(mt).mean is None for mt in METRICS):
            # A statistic with no valid judgment is n/a, never 0; say why, with what the judge said.
            lines += ["", f"n/a: {c.failed} of {c.judgments} judgments failed (no valid judgment)."]
            if scores.failed_reply:
                reply = scores.failed_reply[:300].replace("`", "'").replace("\n", " ")
                lines.append(f"One raw judge reply: `{reply}`")
    else:
        lines.append("No judged scores for this round.")
    total = m.ledger.total if m.ledger else LedgerRow()
    lines += [
        "",
        "## Migration cost (service LLM calls for judging and synthesis)",
        "",
        f"{total.calls} calls ({total.cached} cached), "
        f"{total.input_tokens} input + {total.output_tokens} output tokens, "
        f"${total.usd:.4f}. Stop reason: {m.stop_reason or 'n/a'}.",
        "",
        "## Use",
        "",
        "`llamaduo serve` (OpenAI-compatible, CPU or GPU) or `vllm serve` on this directory; "
        "`ollama create` with the Modelfile next to it.",
    ]
    return "\n".join(lines) + "\n"


ACCEPTANCE_HEADING = "## Acceptance through the serving runtime"


def acceptance_text(parity: Any) -> list[str]:
    """The gate's verdict and the parity table, as the model card and the report show them."""
    lines = [ACCEPTANCE_HEADING, ""]
    if parity.shipped_rejected:
        instead = ", ".join(parity.passes_instead) or "none of the artifacts measured"
        lines.append(f"**REJECTED: `{parity.shipped}`** scores more than {parity.max_drop:g} points below round "
                     f"r{parity.round:02d} beyond the 95% CI. Passes instead: {instead}.")
    elif parity.shipped_rejected is False:
        lines.append(f"`{parity.shipped}` accepted: within {parity.max_drop:g} points of round r{parity.round:02d}.")
    lines += ["", f"| artifact | runtime | {parity.metric} {parity.statistic} (95% CI) | vs round (95% CI) "
              "| identical greedy | tokens/s | peak RSS MB |", "|---|---|---|---|---|---|---|"]

    def ci(v: Any, c: Any, sign: str = "") -> str:
        if v is None:
            return "n/a"
        return f"{v:{sign}.1f}" + (f" ({c[0]:{sign}.1f} to {c[1]:{sign}.1f})" if c else "")

    for row in parity.rows:
        if row.error:
            lines.append(f"| {row.artifact} | {row.runtime} | failed: {row.error} | n/a | n/a | n/a | n/a |")
            continue
        ident = f"{row.identical:.2f}" if row.identical is not None else "n/a"
        tps = f"{row.tokens_per_s:.1f}" if row.tokens_per_s is not None else "n/a"
        rss = f"{row.peak_rss_mb:.0f}" if row.peak_rss_mb is not None else "n/a"
        lines.append(f"| {row.artifact} | {row.runtime} | {ci(row.value, row.ci)} | {ci(row.difference, row.difference_ci, '+')} "
                     f"| {ident} | {tps} | {rss} |")
    return lines


def write_acceptance(store: RunStore, parity: Any) -> None:
    """Put the gate's verdict into the model card (replacing an earlier one)."""
    card = store.model_card_path
    if not card.exists():
        return
    text = card.read_text(encoding="utf-8").split("\n" + ACCEPTANCE_HEADING)[0].rstrip("\n")
    atomic_write_text(card, text + "\n\n" + "\n".join(acceptance_text(parity)) + "\n")
