"""The cost projection: hand-computed break-even, the never case, and inputs read from a run."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from rich.console import Console

from llamaduo import cost
from llamaduo.artifacts import TrainResult
from llamaduo.config import dump_config, from_dict
from llamaduo.errors import UserError
from llamaduo.files import atomic_write_text, write_jsonl
from llamaduo.store import RunStore


def simple(**kw) -> cost.CostInputs:
    base = dict(
        input_tokens_per_month=100e6,
        output_tokens_per_month=20e6,
        service_input_usd_per_mtok=2.5,
        service_output_usd_per_mtok=10.0,
        migration_usd=100.0,
        gpu_price_usd=2000.0,
        gpu_count=1,
        power_watts=400.0,
        utilisation=0.5,
        electricity_usd_per_kwh=0.20,
        horizon_months=12,
    )
    return cost.CostInputs(**{**base, **kw})


def test_break_even_matches_the_hand_computation():
    p = cost.project(simple())
    # Service: 100 M × $2.5 + 20 M × $10 = $450 a month.
    assert p.service_monthly_usd == pytest.approx(450.0)
    # Local: 0.4 kW × 50 % busy × 730 h = 146 kWh × $0.20 = $29.20 a month.
    assert p.energy_kwh_per_month == pytest.approx(146.0)
    assert p.local_monthly_usd == pytest.approx(29.2)
    # Up-front $2,000 GPU + $100 migration, paid back at $420.80 a month.
    assert p.upfront_usd == pytest.approx(2100.0)
    assert p.break_even_months == pytest.approx(2100 / 420.8)
    assert p.savings_over_horizon_usd == pytest.approx(12 * 450 - (2100 + 12 * 29.2))
    # The cumulative lines cross between month 4 and month 5.
    s = p.series
    assert len(s) == 13 and s[0].service_usd == 0 and s[0].local_usd == pytest.approx(2100)
    assert s[4].local_usd > s[4].service_usd and s[5].local_usd < s[5].service_usd


def test_a_cheap_service_never_breaks_even():
    p = cost.project(simple(input_tokens_per_month=1e6, output_tokens_per_month=1e5))
    assert p.service_monthly_usd == pytest.approx(3.5)
    assert p.break_even_months is None
    assert p.savings_over_horizon_usd < 0
    assert cost.break_even_text(p).startswith("never")
    assert all(pt.local_usd > pt.service_usd for pt in p.series)


def test_throughput_sizes_the_gpu_count():
    # One GPU at 100 tokens/s, busy half the time, handles 100 × 2,628,000 × 0.5 = 131.4 M tokens a month.
    assert cost.gpus_needed(simple(local_tokens_per_s=100.0)) == 1
    p = cost.project(simple(input_tokens_per_month=250e6, output_tokens_per_month=50e6, local_tokens_per_s=100.0))
    assert p.gpus == 3
    assert p.upfront_usd == pytest.approx(3 * 2000 + 100)
    assert p.energy_kwh_per_month == pytest.approx(3 * 146.0)


def test_table_and_chart_render_the_projection():
    p = cost.project(simple())
    console = Console(record=True, width=140)
    console.print(cost.render_table(p))
    text = console.export_text()
    assert "$450.00" in text and "$29.20" in text and "4.99 months" not in text and "5.0 months" in text
    svg = cost.chart_svg(p)
    root = ET.fromstring(svg)  # well-formed, standalone SVG
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}polyline")) == 2
    assert "break-even at 5.0 months" in svg


# ------------------------------------------------------------------ from a run
def make_run(tmp_path, **manifest) -> RunStore:
    store = RunStore(tmp_path / "run")
    store.init_manifest(seed=1)
    atomic_write_text(store.config_path, dump_config(from_dict({"name": "run", "service": {"model": "gpt-4o-2024-08-06"}})))
    store.update_manifest(
        best_round=1,
        ledger={"total": {"calls": 40, "cached": 2, "failed": 0, "input_tokens": 9000, "output_tokens": 4000, "usd": 1.25}},
        **manifest,
    )
    for r, tps in ((0, 500.0), (1, 850.0)):
        store.write_train_result(r, TrainResult(
            adapter_dir=store.adapter_dir(r), method="lora", train_loss=1.2, steps=4, examples=8, tokens=4000,
            seconds=4000 / tps, tokens_per_s=tps,
        ))
    return store


def test_from_run_takes_migration_spend_prices_and_training_throughput(tmp_path):
    store = make_run(tmp_path)
    inputs = cost.from_run(store, input_tokens_per_month=5e7, output_tokens_per_month=1e7)
    assert inputs.migration_usd == pytest.approx(1.25)
    # gpt-4o-2024-08-06 is priced as gpt-4o (longest listed prefix).
    assert (inputs.service_input_usd_per_mtok, inputs.service_output_usd_per_mtok) == (2.5, 10.0)
    assert inputs.service_model == "gpt-4o-2024-08-06"
    assert inputs.local_tokens_per_s == 850.0  # the best round's, not round 0's
    assert inputs.throughput_source == "training of round 1, a proxy for serving"


def test_from_run_prefers_measured_inference_throughput(tmp_path):
    store = make_run(tmp_path)
    store.mark_stage("r01/infer", "done", inputs_hash="h", seconds=2.0)
    write_jsonl(store.predictions_path(1), [{"prompt_id": f"p{i}", "sample_index": 0, "text": "x", "new_tokens": 150} for i in range(4)])
    inputs = cost.from_run(store, input_tokens_per_month=1, output_tokens_per_month=1)
    assert inputs.local_tokens_per_s == pytest.approx(300.0)
    assert inputs.throughput_source.startswith("inference of round 1")


def test_from_run_precedence_is_overrides_then_saved_then_measured(tmp_path):
    store = make_run(tmp_path)
    cost.save_inputs(store, input_tokens_per_month=7e7, output_tokens_per_month=2e7, gpu_price_usd=9000, gpu_count=None)
    assert cost.saved_inputs(store) == {"input_tokens_per_month": 7e7, "output_tokens_per_month": 2e7, "gpu_price_usd": 9000}
    again = cost.from_run(store)  # the saved volumes are enough now
    assert (again.input_tokens_per_month, again.gpu_price_usd) == (7e7, 9000)
    changed = cost.from_run(store, gpu_price_usd=1500, migration_usd=None)  # None means "not given"
    assert changed.gpu_price_usd == 1500 and changed.migration_usd == pytest.approx(1.25)
    # A measured number the user replaces loses the run's label for it.
    own = cost.from_run(store, local_tokens_per_s=2000, service_input_usd_per_mtok=3.0)
    assert (own.local_tokens_per_s, own.throughput_source, own.service_model) == (2000, None, None)
    assert "2,000 tokens/s per GPU (given)" in dict(cost.summary_rows(cost.project(own)))["local GPUs"]
    # What the run measures is read afresh: more spend later shows up in the saved projection.
    store.update_manifest(ledger={"total": {"usd": 3.5}})
    assert cost.from_run(store).migration_usd == pytest.approx(3.5)


def test_invalid_inputs_are_not_saved(tmp_path):
    store = make_run(tmp_path)
    with pytest.raises(UserError, match="utilisation"):
        cost.save_inputs(store, input_tokens_per_month=1, output_tokens_per_month=1, utilisation=0)
    with pytest.raises(UserError, match="unknown input"):
        cost.save_inputs(store, input_tokens_per_month=1, output_tokens_per_month=1, gpus=2)
    assert cost.saved_inputs(store) is None


def test_from_run_names_what_is_missing_or_invalid(tmp_path):
    store = make_run(tmp_path)
    with pytest.raises(UserError, match="input_tokens_per_month, output_tokens_per_month not given"):
        cost.from_run(store)
    with pytest.raises(UserError, match="cost: utilisation: Input should be less than or equal to 1"):
        cost.from_run(store, input_tokens_per_month=1, output_tokens_per_month=1, utilisation=2)
    with pytest.raises(UserError, match="cost: horizon_months: Input should be greater than or equal to 1"):
        cost.make_inputs(input_tokens_per_month=1, output_tokens_per_month=1, horizon_months=0)
    with pytest.raises(UserError, match="not a run directory"):
        cost.from_run(RunStore(tmp_path / "nowhere"), input_tokens_per_month=1, output_tokens_per_month=1)
