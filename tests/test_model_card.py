"""The model card of a round whose judge gave no valid judgment: n/a, the failed count and one raw reply."""

from __future__ import annotations

from llamaduo import scoring
from llamaduo.artifacts import Judgment
from llamaduo.config import Config
from llamaduo.data import make_example
from llamaduo.deploy import model_card
from llamaduo.files import write_jsonl
from llamaduo.store import RunStore


def test_a_round_without_valid_judgments_reads_na_with_the_failures_in_the_model_card(tmp_path):
    cfg = Config(name="run", runs_dir=tmp_path, model={"base": "base"})
    store = RunStore(cfg.run_dir)
    write_jsonl(store.test_path, [make_example("Order 9 mugs", '{"quantity": 9}')])
    rows = [Judgment(prompt_id="p", sample_index=0, judge_index=j, ok=False, error="invalid JSON",
                     raw="Sure! The `answer` looks good to me.") for j in range(6)]
    store.write_scores(0, scoring.compute_scores(rows, 1))
    store.init_manifest(0)
    card = model_card(cfg, store, 0)
    assert "| precision | n/a | n/a | n/a | n/a | n/a |" in card and "0.0" not in card.split("## Evaluation")[1].split("## Migration")[0]
    assert "n/a: 6 of 6 judgments failed (no valid judgment)." in card
    assert "One raw judge reply: `Sure! The 'answer' looks good to me.`" in card
