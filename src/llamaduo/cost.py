"""What the migration saves: service-LLM spend against owning GPUs (the paper's Table 2).

    inputs = from_run(store, input_tokens_per_month=2e8, output_tokens_per_month=5e7)
    proj = project(inputs)        # monthly costs, up-front, break-even month, savings, series
    console.print(render_table(proj)); svg = chart_svg(proj)
    save_inputs(store, input_tokens_per_month=2e8, ...)   # later reports include the projection

The model is deliberately simple so a reader can check it by hand:
service per month = tokens × list price; local per month = energy (GPUs × watts × share of
time busy × hours × price per kWh) + fixed overhead; up-front = GPUs × price + the one-off
migration spend (the run's own service bill). Break-even is where the cumulative lines cross.
"""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llamaduo.artifacts import Manifest, StageKey
from llamaduo.errors import UserError
from llamaduo.store import RunStore

if TYPE_CHECKING:
    from rich.table import Table

HOURS_PER_MONTH = 365 * 24 / 12  # 730: an average month
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600


class CostInputs(BaseModel):
    """Everything the projection needs. Defaults describe one 450 W consumer GPU; set your own."""

    model_config = ConfigDict(extra="forbid")
    input_tokens_per_month: float = Field(..., ge=0, description="Prompt tokens the task sends per month.")
    output_tokens_per_month: float = Field(..., ge=0, description="Completion tokens the task receives per month.")
    service_input_usd_per_mtok: float = Field(2.5, ge=0, description="Service price, USD per million input tokens.")
    service_output_usd_per_mtok: float = Field(10.0, ge=0, description="Service price, USD per million output tokens.")
    migration_usd: float = Field(0.0, ge=0, description="One-off cost of the migration (synthesis, judging, training).")
    gpu_price_usd: float = Field(2000.0, ge=0, description="Purchase price of one GPU (or server share).")
    gpu_count: int = Field(1, ge=1, description="GPUs bought; raised when local_tokens_per_s says more are needed.")
    power_watts: float = Field(450.0, ge=0, description="Power draw of one busy GPU, watts.")
    utilisation: float = Field(
        0.5, gt=0, le=1, description="Share of the time the GPUs are busy: sets energy use and sizing headroom."
    )
    electricity_usd_per_kwh: float = Field(0.15, ge=0, description="Electricity price, USD per kWh.")
    local_overhead_usd_per_month: float = Field(0.0, ge=0, description="Hosting, cooling, operations per month.")
    horizon_months: int = Field(24, ge=1, le=600, description="Months projected.")
    local_tokens_per_s: float | None = Field(
        None, gt=0, description="Tokens (in + out) one GPU processes per second; None = trust gpu_count."
    )
    throughput_source: str | None = Field(None, description="Where local_tokens_per_s came from (shown in the report).")
    service_model: str | None = Field(None, description="Service model the prices belong to (shown in the report).")


class MonthPoint(BaseModel):
    month: int
    service_usd: float  # cumulative
    local_usd: float  # cumulative, up-front included


class CostProjection(BaseModel):
    inputs: CostInputs
    gpus: int
    service_monthly_usd: float
    energy_kwh_per_month: float
    local_monthly_usd: float
    upfront_usd: float
    monthly_saving_usd: float
    break_even_months: float | None  # None: the local deployment never pays for itself
    savings_over_horizon_usd: float
    series: list[MonthPoint]


# --------------------------------------------------------------------- the model
def gpus_needed(inputs: CostInputs) -> int:
    """GPUs to serve the monthly tokens at the given busy share; never fewer than gpu_count."""
    if inputs.local_tokens_per_s is None:
        return inputs.gpu_count
    per_gpu = inputs.local_tokens_per_s * SECONDS_PER_MONTH * inputs.utilisation
    demand = inputs.input_tokens_per_month + inputs.output_tokens_per_month
    return max(inputs.gpu_count, math.ceil(demand / per_gpu))


def project(inputs: CostInputs) -> CostProjection:
    """Monthly costs, up-front cost, break-even month and the cumulative series over the horizon."""
    service = (
        inputs.input_tokens_per_month * inputs.service_input_usd_per_mtok
        + inputs.output_tokens_per_month * inputs.service_output_usd_per_mtok
    ) / 1e6
    gpus = gpus_needed(inputs)
    kwh = gpus * inputs.power_watts / 1000 * inputs.utilisation * HOURS_PER_MONTH
    local = kwh * inputs.electricity_usd_per_kwh + inputs.local_overhead_usd_per_month
    upfront = gpus * inputs.gpu_price_usd + inputs.migration_usd
    saving = service - local
    # Equal running costs with nothing to pay back count as even from the start.
    even_now = 0.0 if upfront <= 0 and saving == 0 else None
    break_even = upfront / saving if saving > 0 else even_now
    h = inputs.horizon_months
    series = [MonthPoint(month=m, service_usd=service * m, local_usd=upfront + local * m) for m in range(h + 1)]
    return CostProjection(
        inputs=inputs,
        gpus=gpus,
        service_monthly_usd=service,
        energy_kwh_per_month=kwh,
        local_monthly_usd=local,
        upfront_usd=upfront,
        monthly_saving_usd=saving,
        break_even_months=break_even,
        savings_over_horizon_usd=service * h - (upfront + local * h),
        series=series,
    )


# ------------------------------------------------------------------ from a run
def saved_inputs(store: RunStore) -> dict[str, Any] | None:
    """Values saved with `save_inputs` (the report projects only when there are some)."""
    saved = store.read_manifest().cost_inputs if store.exists() else None
    return dict(saved) if saved else None


def save_inputs(store: RunStore, **given: Any) -> CostInputs:
    """Keep the values the user gave in the manifest, so every later report projects too.

    Only given values are kept (merged over earlier ones); what the run measures (its spend,
    its throughput) is read afresh each time. Invalid values raise before anything is saved.
    """
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(CostInputs.model_fields))
    if unknown:
        raise UserError(f"cost: unknown input(s): {', '.join(unknown)}")
    inputs = from_run(store, **given)
    store.update_manifest(cost_inputs={**(saved_inputs(store) or {}), **given})
    return inputs


def from_run(store: RunStore, **overrides: Any) -> CostInputs:
    """Inputs from a run: its service spend, its service prices, the best round's throughput.

    Precedence: explicit overrides, then inputs saved in the manifest, then what the run
    measured, then the defaults. The token volumes must come from overrides or saved inputs.
    """
    if not store.exists():
        raise UserError(f"{store.root}: not a run directory (no manifest.json)")
    manifest = store.read_manifest()
    derived: dict[str, Any] = {}
    if manifest.ledger is not None:
        derived["migration_usd"] = manifest.ledger.total.usd
    derived.update(_service_prices(store))
    tps, source = run_throughput(store, manifest)
    if tps is not None:
        derived["local_tokens_per_s"], derived["throughput_source"] = tps, source
    given = {**(saved_inputs(store) or {}), **{k: v for k, v in overrides.items() if v is not None}}
    # A label the run derived must not stay on a number the user replaced.
    if "local_tokens_per_s" in given:
        derived.pop("throughput_source", None)
    if {"service_input_usd_per_mtok", "service_output_usd_per_mtok"} & given.keys():
        derived.pop("service_model", None)
    return make_inputs(**{**derived, **given})


def make_inputs(**values: Any) -> CostInputs:
    """Validated inputs without a run; a problem is one line naming the field."""
    values = {k: v for k, v in values.items() if v is not None}
    missing = [k for k in ("input_tokens_per_month", "output_tokens_per_month") if k not in values]
    if missing:
        raise UserError(f"cost: {', '.join(missing)} not given (pass e.g. --input-tokens-per-month 2e8)")
    try:
        return CostInputs.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"cost: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def _service_prices(store: RunStore) -> dict[str, Any]:
    """List prices of the run's service model, from its resolved config.yaml."""
    from llamaduo.config_file import load_config

    try:
        service = load_config(store.config_path).service
    except UserError:
        return {}
    prices = service.prices
    model = service.model
    match = model if model in prices else max((k for k in prices if model.startswith(k)), key=len, default=None)
    out: dict[str, Any] = {"service_model": model}
    if match:
        out["service_input_usd_per_mtok"] = prices[match].input_per_mtok
        out["service_output_usd_per_mtok"] = prices[match].output_per_mtok
    return out


def run_throughput(store: RunStore, manifest: Manifest | None = None) -> tuple[float | None, str | None]:
    """Tokens/s of the best round: measured inference when recorded, else training (a proxy)."""
    manifest = manifest if manifest is not None else store.read_manifest()
    best = manifest.best_round
    if best is None:
        rounds = store.rounds()
        if not rounds:
            return None, None
        best = rounds[-1]
    rec = manifest.stage(StageKey.step("infer", best))
    if rec is not None and _positive(rec.seconds) and store.predictions_path(best).exists():
        new = sum(p.new_tokens for p in store.read_predictions(best))
        if new > 0:
            return new / float(rec.seconds), f"inference of round {best}, generated tokens only"
    if store.train_result_path(best).exists():
        tr = store.read_train_result(best)
        if _positive(tr.tokens_per_s):
            return float(tr.tokens_per_s), f"training of round {best}, a proxy for serving"
    return None, None


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# ------------------------------------------------------------------- rendering
def usd(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    sign = "-" if v < 0 else ""
    v = abs(v)
    return f"{sign}${v:,.2f}" if v < 10_000 else f"{sign}${v:,.0f}"


def break_even_text(p: CostProjection) -> str:
    if p.break_even_months is None:
        return "never (local costs more per month than the service)"
    if p.break_even_months == 0:
        return "immediately"
    when = "within" if p.break_even_months <= p.inputs.horizon_months else "after"
    return f"{p.break_even_months:.1f} months ({when} the {p.inputs.horizon_months}-month horizon)"


def summary_rows(p: CostProjection) -> list[tuple[str, str]]:
    """(label, value) rows shared by the terminal table, report.md and report.html."""
    i = p.inputs
    tokens = f"{i.input_tokens_per_month:,.0f} in + {i.output_tokens_per_month:,.0f} out"
    prices = f"${i.service_input_usd_per_mtok:g} / ${i.service_output_usd_per_mtok:g} per Mtok in/out"
    gpus = f"{p.gpus} × {usd(i.gpu_price_usd)}, {i.power_watts:g} W, {i.utilisation:.0%} busy"
    if i.local_tokens_per_s is not None:
        gpus += f"; {i.local_tokens_per_s:,.0f} tokens/s per GPU ({i.throughput_source or 'given'})"
    return [
        ("tokens per month", tokens),
        ("service" + (f" ({i.service_model})" if i.service_model else ""), prices),
        ("service cost per month", usd(p.service_monthly_usd)),
        ("local GPUs", gpus),
        ("energy per month", f"{p.energy_kwh_per_month:,.1f} kWh × ${i.electricity_usd_per_kwh:g}/kWh"),
        ("local cost per month", usd(p.local_monthly_usd)),
        ("up-front (GPUs + migration)", f"{usd(p.upfront_usd)} (migration {usd(i.migration_usd)})"),
        ("break-even", break_even_text(p)),
        (f"savings over {i.horizon_months} months", usd(p.savings_over_horizon_usd)),
    ]


def render_table(p: CostProjection) -> Table:
    """The projection as a rich table for the terminal."""
    from rich.table import Table

    t = Table(title="Cost projection: service LLM vs local model", show_header=False)
    t.add_column("item", style="bold")
    t.add_column("value")
    for label, value in summary_rows(p):
        t.add_row(label, value)
    return t


SERVICE_COLOR = "#d9480f"
LOCAL_COLOR = "#1971c2"


def chart_svg(p: CostProjection, width: int = 1060, height: int = 300) -> str:
    """Cumulative cost, service vs local, month by month, as a self-contained inline SVG."""
    left, right, top, bottom = 76, 24, 34, 46
    w, h = width - left - right, height - top - bottom
    months = p.inputs.horizon_months
    ymax, ystep = nice_axis(max(max(pt.service_usd, pt.local_usd) for pt in p.series))
    font = 'font-family="system-ui, sans-serif" font-size="12"'
    ink = f'{font} fill="#495057"'

    def x(m: float) -> float:
        return left + w * m / months

    def y(v: float) -> float:
        return top + h * (1 - v / ymax)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
        f'style="max-width:{width}px" role="img" aria-label="cumulative cost, service LLM vs local model">'
    ]
    for k in range(round(ymax / ystep) + 1):
        v = ystep * k
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e9ecef"/>')
        parts.append(f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end" {ink}>{escape(money_tick(v, ystep))}</text>')
    step = max(1, math.ceil(months / 12))
    for m in range(0, months + 1, step):
        parts.append(f'<text x="{x(m):.1f}" y="{top + h + 18}" text-anchor="middle" {ink}>{m}</text>')
    parts.append(f'<text x="{left + w / 2:.1f}" y="{height - 6}" text-anchor="middle" {ink}>months</text>')
    parts.append(f'<line x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}" stroke="#adb5bd"/>')
    for key, color in (("service_usd", SERVICE_COLOR), ("local_usd", LOCAL_COLOR)):
        pts = " ".join(f"{x(pt.month):.1f},{y(getattr(pt, key)):.1f}" for pt in p.series)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2.5"/>')
    if p.break_even_months is not None and 0 < p.break_even_months <= months:
        be = p.break_even_months
        parts.append(
            f'<line x1="{x(be):.1f}" x2="{x(be):.1f}" y1="{top}" y2="{top + h}" stroke="#2b8a3e" stroke-dasharray="4 3"/>'
        )
        anchor = "end" if x(be) > left + w * 0.75 else "start"
        dx = -6 if anchor == "end" else 6
        parts.append(
            f'<text x="{x(be) + dx:.1f}" y="{top + 14}" text-anchor="{anchor}" {font} fill="#2b8a3e">'
            f"break-even at {be:.1f} months</text>"
        )
    for i, (label, color) in enumerate((("service LLM", SERVICE_COLOR), ("local model", LOCAL_COLOR))):
        lx = left + i * 130
        parts.append(f'<rect x="{lx}" y="8" width="14" height="4" fill="{color}"/>')
        parts.append(f'<text x="{lx + 20}" y="15" {ink}>{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def nice_axis(vmax: float, ticks: int = 4, integer: bool = False) -> tuple[float, float]:
    """(top, step) of an axis from 0 with about `ticks` steps of 1, 2, 2.5 or 5 × a power of ten."""
    if vmax <= 0 or not math.isfinite(vmax):
        return (4.0, 1.0) if integer else (1.0, 0.25)
    raw = vmax / ticks
    mag = 10 ** math.floor(math.log10(raw))
    steps = [f * mag for f in (1, 2, 2.5, 5, 10)]
    if integer:  # counts get whole-number ticks
        steps = [st for st in steps if st >= 1 and float(st).is_integer()] or [1.0]
    step = next((st for st in steps if st >= raw * (1 - 1e-9)), steps[-1])
    return step * math.ceil(vmax / step - 1e-9), step


def money_tick(v: float, step: float) -> str:
    """An axis label in USD with as many decimals as the step needs."""
    digits = 0 if step >= 1 else 2 if step >= 0.01 else 4
    return f"${v:,.{digits}f}"
