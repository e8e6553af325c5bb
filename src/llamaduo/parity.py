"""`llamaduo accept --runtime llamacpp` / `--endpoint`: every artifact judged through what serves it.

Per artifact (the merged HF dir under `llamaduo serve`, each GGUF under llama.cpp's server, or any
endpoint) the test split is answered and judged with the run's protocol (`accept.accept`), a greedy
pass with one client gives tokens/s and the rate of answers identical to the reference, and the
server process's peak RSS is read. The gate (`deploy.max_drop`) rejects the shipped artifact when its
drop from the best round exceeds max_drop with the whole 95% CI; the table says which passes instead.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaduo import runtime as rt_mod
from llamaduo.accept import accept, answer_text, candidate_scores, request_of, statistic
from llamaduo.artifacts import Parity, ParityRow
from llamaduo.config import Config
from llamaduo.data import Example, load_examples
from llamaduo.deploy import num_ctx, pick_round, read_deploy_manifest, write_acceptance
from llamaduo.errors import UserError
from llamaduo.files import write_json
from llamaduo.store import RunStore

if TYPE_CHECKING:
    from llamaduo.service import Client

UNQUANTIZED = ("f32", "bf16", "f16")


def greedy_pass(endpoint: str, model: str, test: list[Example], cfg: Config,
                extra_body: dict[str, Any] | None = None, dialect: str = "openai") -> tuple[dict[str, str], float | None]:
    """One client, one prompt at a time, temperature 0: the answers and decode tokens/s."""
    import openai

    client = openai.OpenAI(base_url=endpoint, api_key="not-needed", max_retries=2, timeout=600)
    texts: dict[str, str] = {}
    tokens, seconds, counted = 0, 0.0, True
    for ex in test:
        t = time.perf_counter()
        r = client.chat.completions.create(
            model=model, **request_of(ex, dialect), temperature=0.0, n=1,
            max_tokens=cfg.infer.max_new_tokens, stop=cfg.infer.stop or None, seed=cfg.seed, extra_body=extra_body,
        )
        seconds += time.perf_counter() - t
        texts[ex.id] = answer_text(r.choices[0].message)
        if r.usage is None or r.usage.completion_tokens is None:
            counted = False
        else:
            tokens += r.usage.completion_tokens
    client.close()
    return texts, (tokens / seconds if counted and seconds > 0 and tokens else None)


def bootstrap_ci(values: dict[str, list[float]], stat: str, seed: int, resamples: int = 1000) -> tuple[float, float] | None:
    """95% CI of a statistic from resampling test prompts."""
    import numpy as np

    pids = sorted(values)
    if not pids:
        return None
    rng = np.random.default_rng(seed)
    draws = [statistic([v for i in rng.integers(0, len(pids), len(pids)) for v in values[pids[i]]], stat)
             for _ in range(resamples)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def identical_rate(texts: dict[str, str], reference: dict[str, str] | None) -> float | None:
    shared = sorted(set(texts) & set(reference or {}))
    if not shared or reference is None:
        return None
    return sum(texts[p] == reference[p] for p in shared) / len(shared)


def _measure(cfg: Config, store: RunStore, client: Client, name: str, runtime: Any, r: int, test: list[Example],
             reference: tuple[dict[str, str] | None, str | None]) -> tuple[ParityRow, dict[str, str]]:
    dialect = getattr(runtime, "dialect", "openai")
    res = accept(cfg, store, runtime.base_url, client, model=runtime.model, round=r, extra_body=runtime.extra_body,
                 dialect=dialect)
    texts, tps = greedy_pass(runtime.base_url, runtime.model, test, cfg, runtime.extra_body, dialect)
    rss = runtime.peak_rss_mb() if hasattr(runtime, "peak_rss_mb") else None
    keep = store.parity_dir(name)
    keep.mkdir(parents=True, exist_ok=True)
    for src in (store.predictions_path("accept"), store.judgments_path("accept"), store.scores_path("accept"),
                store.accept_comparison_path):
        shutil.copyfile(src, keep / src.name)
    rule = cfg.judge.pass_rule.judged()  # judge scores only
    served = candidate_scores(store.read_judgments("accept"), rule.metric)
    ref, label = reference
    row = ParityRow(
        artifact=name, runtime=getattr(runtime, "runtime_label", runtime.base_url), value=res.served_value,
        ci=bootstrap_ci(served, rule.statistic, cfg.seed), difference=res.difference,
        difference_ci=(res.ci_low, res.ci_high), identical=identical_rate(texts, ref),
        identical_to=label if ref is not None else None, tokens_per_s=tps, peak_rss_mb=rss, prompts=res.prompts,
    )
    row.rejected = row.difference_ci[1] < -cfg.deploy.max_drop if row.difference_ci else None
    return row, texts


class _Endpoint:
    """Any OpenAI-compatible server, measured as it is (its memory is not ours to read)."""

    def __init__(self, url: str, model: str | None):
        self.base_url, self.model, self.extra_body, self.runtime_label = url, model, None, url

    def __enter__(self) -> _Endpoint:
        if self.model is None:
            import openai

            try:
                self.model = openai.OpenAI(base_url=self.base_url, api_key="not-needed").models.list().data[0].id
            except (openai.OpenAIError, IndexError) as e:
                raise UserError(f"{self.base_url}: cannot list models ({type(e).__name__}); pass --model") from None
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _order(kind: str) -> int:
    order = ["merged", *UNQUANTIZED, "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0"]
    return order.index(kind) if kind in order else len(order)


def artifacts_to_measure(cfg: Config, store: RunStore, artifact: str) -> dict[str, Callable[[], Any]]:
    """name → a runtime factory, merged first and the shipped GGUF last (so accept/ ends up holding it)."""
    manifest = read_deploy_manifest(store)
    ok = {g.kind: store.deploy_dir / g.file for g in manifest.gguf if g.status == "ok" and g.file}
    lora = {g.kind: store.deploy_dir / g.adapter for g in manifest.gguf if g.status == "ok" and g.adapter}
    merged_dir = store.merged_dir
    if artifact == "all":
        names = (["merged"] if (merged_dir / "config.json").exists() else []) + sorted(ok, key=_order)
    else:
        if artifact != "merged" and artifact not in ok:
            failed = manifest.file(artifact)
            why = f"deploy failed for it: {failed.error}" if failed and failed.error else "deploy did not write it"
            raise UserError(f"accept --artifact {artifact}: {why}; GGUFs written: {', '.join(ok) or 'none'}")
        names = [artifact]
    shipped = manifest.shipped or cfg.deploy.shipped
    names.sort(key=lambda n: n == shipped)
    ctx = num_ctx(cfg, _model_config(merged_dir))
    top_k = _top_k(merged_dir)
    factories: dict[str, Callable[[], Any]] = {}
    for name in names:
        if name == "merged":
            factories[name] = lambda: _labelled(rt_mod.llamaduo_serve(store.root), "llamaduo serve")
        else:
            factories[name] = lambda p=ok[name], a=lora.get(name): _labelled(
                rt_mod.llamacpp(p, ctx, top_k, lora=a), "llama.cpp" + (" + LoRA" if a else ""))
    return factories


def _labelled(runtime: Any, label: str) -> Any:
    runtime.runtime_label = label
    return runtime


def _model_config(merged: Path) -> Any:
    import json

    p = merged / "config.json"
    data = json.loads(p.read_text()) if p.exists() else {}
    return type("ModelConfigView", (), {"max_position_embeddings": data.get("max_position_embeddings")})()


def _top_k(merged: Path) -> int | None:
    import json

    p = merged / "generation_config.json"
    data = json.loads(p.read_text()) if p.exists() else {}
    return data.get("top_k")  # None: infer samples from every token, as top_k 0 does


def run_parity(cfg: Config, store: RunStore, client: Client, *, artifact: str = "all", endpoint: str | None = None,
               model: str | None = None, round: int | None = None) -> Parity:
    """Judge the artifacts (or the endpoint), write deploy/parity.json and the model card's verdict."""
    from llamaduo import judge as judge_mod

    r = pick_round(store, round)
    test = judge_mod.select_test(cfg, load_examples(store.test_path))
    rule = cfg.judge.pass_rule.judged()  # judge scores only
    if endpoint is not None:
        factories: dict[str, Callable[[], Any]] = {"endpoint": lambda: _Endpoint(endpoint, model)}
        shipped = "endpoint"
    else:
        factories = artifacts_to_measure(cfg, store, artifact)
        shipped = read_deploy_manifest(store).shipped or cfg.deploy.shipped  # what deploy chose to ship
    reference: tuple[dict[str, str] | None, str | None] = (None, None)
    if cfg.infer.temperature == 0 and store.predictions_path(r).exists():
        preds = [p for p in store.read_predictions(r) if p.sample_index == 0]
        reference = ({p.prompt_id: p.text for p in preds}, f"round r{r:02d}'s judged (greedy) predictions")
    rows: list[ParityRow] = []
    for name, make in factories.items():
        try:
            with make() as runtime:
                row, texts = _measure(cfg, store, client, name, runtime, r, test, reference)
        except UserError as e:
            rows.append(ParityRow(artifact=name, runtime="n/a", error=str(e)))
            continue
        rows.append(row)
        if name == "merged" and reference[0] is None:
            reference = (texts, "the merged model's greedy answers (llamaduo serve)")
    ref_scores = candidate_scores(store.read_judgments(r), rule.metric)
    parity = Parity(round=r, metric=rule.metric, statistic=rule.statistic, max_drop=cfg.deploy.max_drop,
                    round_value=statistic([v for vs in ref_scores.values() for v in vs], rule.statistic),
                    shipped=shipped if shipped in factories else None, rows=rows)
    mine = parity.row(shipped) if parity.shipped else None
    if mine is not None:
        parity.shipped_rejected = mine.rejected if mine.error is None else True
    others = [row for row in rows if row.artifact != shipped and row.rejected is False and row.error is None]
    parity.passes_instead = [row.artifact for row in sorted(others, key=lambda x: -_order(x.artifact))]
    write_json(store.parity_path, parity.model_dump(mode="json", exclude_none=True))
    with contextlib.suppress(OSError):
        write_acceptance(store, parity)
    return parity
