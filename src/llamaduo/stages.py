"""The stages of a run over one run directory: prepare, baseline, and each round's synth, train,
infer and judge. Each states its inputs and its work; the `Engine` decides whether it runs and
records it. `loop.run` and the CLI's single-stage commands call the same methods.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaduo.artifacts import Scores, StageKey
from llamaduo.config import Config, dump_config
from llamaduo.data import Example, load_examples
from llamaduo.engine import Decision, Engine, Outcome
from llamaduo.errors import ServiceUnavailable, UserError
from llamaduo.files import atomic_write_text, write_jsonl
from llamaduo.hashing import hash_dir, hash_file
from llamaduo.prepare import PrepareResult
from llamaduo.progress import Display, make_display
from llamaduo.reporting import BarFactory, bar_for
from llamaduo.store import RunStore

if TYPE_CHECKING:
    from llamaduo.service import Client


def synth_count(cfg: Config, r: int) -> int:
    """Synthetic pairs requested in round r ≥ 1 by the growth schedule."""
    if cfg.synth.growth == "double":
        return min(cfg.synth.per_round * 2 ** (r - 1), cfg.synth.max_per_round)
    return min(cfg.synth.per_round, cfg.synth.max_per_round)


def _path_hash(p: Path | None) -> str:
    if p is None:
        return ""
    p = Path(p)
    if not p.is_dir() and not p.is_file():  # a FIFO or device would block the read forever
        raise UserError(f"{p}: not a regular file or a directory")
    try:
        return hash_dir(p) if p.is_dir() else hash_file(p)
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror})") from None


def failed_judge_calls(rows: list[Any]) -> tuple[int, int]:
    """(judge calls the service never answered, judge calls made): rows without a reply, not bad replies."""
    made = [j for j in rows if not (j.error or "").startswith("no candidate")]
    return sum(1 for j in made if not j.ok and j.raw is None), len(made)


class Run:
    """One run directory with its config and (lazily) its service client."""

    def __init__(
        self, cfg: Config, display: Display | None = None, client: Client | None = None, bars: BarFactory | None = None
    ):
        self.cfg = cfg
        self.store = RunStore(cfg.run_dir)
        self.display = display or make_display("quiet")
        self.bars = bars  # progress bars for service calls and generation; None draws nothing
        self._client = client
        self.engine = Engine(self.store, self.display, ledger=self._ledger)

    # ---- collaborators
    @property
    def client(self) -> Client:
        if self._client is None:
            import sqlite3

            from llamaduo.service import ServiceClient

            try:
                self._client = ServiceClient(self.cfg.service, db_path=self.store.service_db)
            except sqlite3.DatabaseError as e:
                raise UserError(
                    f"{self.store.service_db}: not a readable call log ({e}); move it aside to start the cache afresh"
                ) from None
        return self._client

    def _ledger(self) -> Any:
        return self._client.ledger() if self._client is not None else None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # ---- what a service request depends on: change one and the stages that send it rerun
    def service_request_settings(self) -> dict[str, Any]:
        sv = self.cfg.service
        return {"provider": sv.provider, "base_url": sv.base_url, "structured_output": sv.structured_output,
                "json_retries": sv.json_retries}

    def judge_request_components(self) -> dict[str, Any]:
        from llamaduo import judge as judge_mod

        return {
            # require_kappa and pass_rule.also change the pass rule, not the request: changing them must not
            # rerun the judge (and runs from before `also` existed keep their hashes)
            "judge": self.cfg.judge.model_dump(mode="json", exclude={"require_kappa": True, "pass_rule": {"also"}}),
            "model": self.cfg.judge_model,
            "service": self.service_request_settings(),
            "template": judge_mod.judge_template(self.cfg).hash,
        }

    # ---- data of a round
    def train_set(self, r: int) -> list[Example]:
        examples = load_examples(self.store.train_path)
        for k in range(1, r + 1):
            for p in (self.store.synthetic_path(k), self.store.traffic_path(k)):
                if p.exists():
                    examples += load_examples(p)
        return examples

    def traffic_tests(self, r: int | None) -> list[Path]:
        """Held-out live prompts that extend the test split from their round on (`run --from-shadow`)."""
        paths = [self.store.traffic_path(k, "test") for k in range(1, (r or 0) + 1)]
        return [p for p in paths if p.exists()]

    def test_set(self, r: int | None = None) -> list[Example]:
        """The test split; from a traffic round on (r given), extended by its held-out live prompts."""
        examples = load_examples(self.store.test_path)
        for p in self.traffic_tests(r):
            examples += load_examples(p)
        return examples

    # ---- prepare
    def prepare_components(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "data_config": cfg.data.model_dump(mode="json", exclude={"input", "test_file", "tokenizer"}),
            "input": _path_hash(cfg.data.input),
            "test_file": _path_hash(cfg.data.test_file) if cfg.data.test_file else "",
            "seed": str(cfg.seed),
        }

    def prepare(self, force: bool = False) -> tuple[str, PrepareResult | None]:
        """Validate and split the coverage data (skipped when done with the same inputs, unless `force`)."""
        from llamaduo import prepare as prepare_mod

        cfg, store = self.cfg, self.store
        key = StageKey(name="prepare")
        if cfg.data.input is None:
            rec = store.stage_record(key)
            if store.train_path.exists() and store.test_path.exists():
                return (rec.inputs_hash or "given") if rec else "given", None
            raise UserError("data.input is not set and the run directory has no data/train.jsonl")
        if not Path(cfg.data.input).exists():
            raise UserError(f"data.input: {cfg.data.input}: no such file or directory")
        outputs = [store.train_path, store.test_path]
        result: list[PrepareResult] = []

        def work(_: Decision) -> Outcome:
            res = prepare_mod.prepare(cfg, store)
            for w in res.warnings:
                self.display({"event": "warning", "message": w})
            result.append(res)
            return Outcome(f"train {res.train_count}, test {res.test_count}", {"train": res.train_count, "test": res.test_count})

        # force: `llamaduo prepare` always re-reads and shows the data, recorded as the loop's prepare is.
        h = self.engine.run(key, self.prepare_components(), outputs, work, force=force)
        return h, (result[0] if result else None)

    # ---- synth (round ≥ 1)
    def synth(self, r: int, upstream: str) -> str:
        from llamaduo import dedup, synth

        if r < 1:
            raise UserError("synthesis runs in rounds ≥ 1 (round 0 trains on the coverage data only)")
        cfg, store = self.cfg, self.store
        components = {
            "upstream": upstream,
            "synth": cfg.synth.model_dump(mode="json"),
            "dedup": cfg.dedup.model_dump(mode="json"),
            "model": cfg.synth_model,
            "service": self.service_request_settings(),
            "template": synth.synth_template(cfg).hash,
            "count": str(synth_count(cfg, r)),
            "seed": str(cfg.seed),
        }

        def work(_: Decision) -> Outcome:
            existing = self.train_set(r - 1)
            rng = random.Random(f"{cfg.seed}-synth-{r}")
            res = synth.synthesize(
                cfg, self.client, load_examples(store.train_path), synth_count(cfg, r), r, rng,
                weights=self._category_weights(r - 1), bars=self.bars,
            )
            self.check_service(f"synth r{r:02d}", res.failed_calls, res.calls, kept_nothing=not res.examples)
            kept, rejected = dedup.clean(res.examples, existing, self.test_set(r), cfg)
            rejected = list(res.rejected) + list(rejected)
            store.write_rejected(r, rejected)
            store.write_synthetic(r, kept)
            return Outcome(f"{len(kept)} kept, {len(rejected)} rejected",
                           {"kept": len(kept), "rejected": len(rejected), "calls": res.calls})

        outputs = [store.synthetic_path(r), store.rejected_path(r)]
        return self.engine.run(StageKey.step("synth", r), components, outputs, work)

    # ---- traffic (a round's data from shadowed live requests, in synth's place)
    def traffic(self, r: int, upstream: str) -> str:
        from llamaduo import dedup, traffic

        cfg, store = self.cfg, self.store
        pairs = traffic.live_pairs(store)
        share = cfg.serve.shadow_test_share
        components = {"upstream": upstream, "pairs": traffic.pairs_hash(pairs), "dedup": cfg.dedup.model_dump(mode="json"),
                      "share": str(share), "seed": str(cfg.seed)}

        def work(_: Decision) -> Outcome:
            train, test = traffic.split_traffic(pairs, r, cfg.seed, share, traffic.used_origins(store, r))
            # Decontaminated against the test split as it will be judged from this round on.
            kept, rejected = dedup.clean(train, self.train_set(r - 1), self.test_set(r - 1) + test, cfg)
            write_jsonl(store.traffic_path(r, "train"), kept)
            write_jsonl(store.traffic_path(r, "test"), test)
            write_jsonl(store.traffic_path(r, "rejected"), rejected)
            return Outcome(f"{len(kept)} live examples kept, {len(rejected)} rejected, {len(test)} held out to extend the test split",
                           {"kept": len(kept), "rejected": len(rejected), "test": len(test)})

        outputs = [store.traffic_path(r, part) for part in ("train", "test", "rejected")]  # type: ignore[arg-type]
        return self.engine.run(StageKey.step("traffic", r), components, outputs, work)

    def _category_weights(self, prev: int) -> dict[str, float] | None:
        """Weight seeds toward the categories that scored lowest last round."""
        if prev < 0 or not self.store.scores_path(prev).exists():
            return None
        metric = self.cfg.judge.pass_rule.judged().metric  # per-category means are judge scores
        vals = {c: v.get(metric) for c, v in self.store.read_scores(prev).per_category.items()}
        vals = {c: float(v) for c, v in vals.items() if v is not None}
        return {c: max(1.0, 101.0 - v) for c, v in vals.items()} or None

    # ---- train
    def train(self, r: int, upstream: str) -> str:
        from llamaduo import train as train_mod

        cfg, store = self.cfg, self.store
        examples = self.train_set(r)
        init_adapter = store.adapter_dir(r - 1) if cfg.train.continue_from_previous and r > 0 else None
        prev_train = store.stage_record(StageKey.step("train", r - 1)) if init_adapter is not None else None
        components = {
            "upstream": upstream,
            "model": cfg.model.model_dump(mode="json"),
            "train": cfg.train.model_dump(mode="json"),
            "examples": [e.id for e in examples],
            "init_adapter": (prev_train.inputs_hash or "") if prev_train else "",
            "seed": str(cfg.seed),
        }

        def work(d: Decision) -> Outcome:
            if d.previous and d.previous.inputs_hash != d.inputs_hash:
                # Checkpoints of different inputs must not be resumed from.
                shutil.rmtree(store.checkpoints_dir(r), ignore_errors=True)
            shutil.rmtree(store.adapter_dir(r), ignore_errors=True)
            res = train_mod.train(cfg, examples, store.adapter_dir(r), init_adapter=init_adapter)
            if int(os.environ.get("RANK", "0")) != 0:
                return Outcome(record=False)  # under `accelerate launch` only the main process records
            store.write_train_result(r, res)
            dropped = f", {res.dropped_too_long} dropped (prompt fills train.max_length)" if res.dropped_too_long else ""
            return Outcome(f"{len(examples)} examples{dropped}, loss {res.train_loss:.3f}, {res.tokens_per_s:.0f} tok/s",
                           {"examples": len(examples)})

        return self.engine.run(StageKey.step("train", r), components, [store.adapter_dir(r)], work)

    # ---- infer
    def infer(self, r: int, upstream: str) -> str:
        from llamaduo import infer as infer_mod

        cfg, store = self.cfg, self.store
        components = {
            "upstream": upstream,
            "infer": cfg.infer.model_dump(mode="json", exclude={"vllm"}),  # the GPU layout changes no answer
            "test": hash_file(store.test_path),
            "seed": str(cfg.seed),
        }
        if self.traffic_tests(r):  # only then: rounds judged before live prompts keep their hash
            components["traffic_test"] = [hash_file(p) for p in self.traffic_tests(r)]

        def work(_: Decision) -> Outcome:
            completions = infer_mod.run_inference(
                cfg, self.test_set(r), store.adapter_dir(r), progress=bar_for(self.bars, "generating")
            )
            store.write_predictions(r, completions)
            new_tokens = sum(c.new_tokens for c in completions)
            return Outcome(f"{len(completions)} candidates", {"predictions": len(completions), "new_tokens": new_tokens})

        return self.engine.run(StageKey.step("infer", r), components, [store.predictions_path(r)], work)

    # ---- judge
    def judge(self, r: int, upstream: str) -> tuple[str, Scores]:
        from llamaduo.evaluate import evaluate

        cfg, store = self.cfg, self.store
        components = {"upstream": upstream, **self.judge_request_components()}

        def work(_: Decision) -> Outcome:
            ev = evaluate(cfg, self.client, store, r, self.test_set(r), bars=self.bars)
            self.check_service(f"judge r{r:02d}", *failed_judge_calls(store.read_judgments(r)))
            return Outcome(f"{ev.scores.counts.judgments} judgments")

        outputs = [store.judgments_path(r), store.scores_path(r)]
        h = self.engine.run(StageKey.step("judge", r), components, outputs, work)
        return h, store.read_scores(r)

    # ---- service baseline (performance matching)
    def baseline(self, upstream: str) -> Scores | None:
        from llamaduo import judge as judge_mod
        from llamaduo.evaluate import evaluate

        cfg, store = self.cfg, self.store
        if cfg.judge.pass_rule.relative_to_service is None:
            return None
        components = {
            "upstream": upstream,
            **self.judge_request_components(),
            "service_model": cfg.service.model,
            "k": str(cfg.infer.num_samples),
        }

        def work(_: Decision) -> Outcome:
            test = self.test_set()
            answers = judge_mod.service_baseline(cfg, self.client, test, bars=self.bars)
            evaluate(cfg, self.client, store, "baseline", test, answers, bars=self.bars)
            failed, total = failed_judge_calls(store.read_judgments("baseline"))
            self.check_service("baseline", failed + sum(not a.ok for a in answers), total + len(answers))
            return Outcome("service baseline judged")

        outputs = [store.predictions_path("baseline"), store.judgments_path("baseline"), store.scores_path("baseline")]
        self.engine.run(StageKey(name="baseline"), components, outputs, work)
        return store.read_scores("baseline")

    def check_service(self, what: str, failed: int, total: int, kept_nothing: bool = False) -> None:
        """Raise `ServiceUnavailable` when calls failed beyond `service.max_failed_share` (or all that
        was asked for is lost to failed calls): the engine then records the stage failed, not done."""
        share = self.cfg.service.max_failed_share
        if total and failed and (failed / total > share or kept_nothing):
            raise ServiceUnavailable(
                f"{what}: {failed} of {total} service calls failed after retries (service.max_failed_share {share:g});"
                f" {self.cfg.service.base_url or self.cfg.service.provider} looks unavailable. Rerun when it is back:"
                f" exactly the failed calls are retried, the {total - failed} answered ones come from the cache"
            )

    def write_config(self) -> None:
        atomic_write_text(self.store.config_path, dump_config(self.cfg))
