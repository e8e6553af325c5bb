"""The sections of the config schema for the pipeline: data, service, judge, synth, dedup, model,
train, infer, loop and tracking. Every default is declared once, with a description."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llamaduo.errors import UserError
from llamaduo.redact import looks_like_secret


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf` epochs or a `.nan` threshold is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def env_var_name(v: str | None) -> str | None:
    """An environment-variable name; a pasted key is refused without being repeated."""
    if v is None:
        return v
    if looks_like_secret(v):
        raise ValueError("this looks like a key itself, not the name of the environment variable holding it; "
                         "put the key in an environment variable and name that variable here (the value was not saved)")
    if not _ENV_NAME.match(v):
        raise ValueError("must be an environment-variable name (A-Z, 0-9, _; e.g. OPENAI_API_KEY)")
    return v


def http_url(v: str | None) -> str | None:
    from urllib.parse import urlparse

    if v is None:
        return v
    u = urlparse(v)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError("must be an http(s) URL with a host, e.g. http://127.0.0.1:8000/v1")
    return v


class ConfigError(UserError):
    """A config problem, already phrased as one line for the user."""


# ----------------------------------------------------------------------------- data
class FieldMap(Strict):
    id: str = Field("id", description="Field holding a record id (optional in the data).")
    prompt: str = Field("prompt", description="Field holding the instruction text.")
    response: str = Field("response", description="Field holding the reference answer.")
    category: str = Field("category", description="Field holding the task category (optional).")
    messages: str = Field(
        "messages", description="Field holding OpenAI-style messages; used when prompt/response are absent."
    )
    system: str = Field("system", description="Field holding an optional system prompt.")


class DataConfig(Strict):
    input: Path | None = Field(None, description="Coverage dataset: JSONL, JSON array, CSV, Parquet or a HF dataset dir.")
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "hf"] = Field(
        "auto", description="Input format; 'auto' picks by file extension (a directory is a HF dataset)."
    )
    fields: FieldMap = Field(default_factory=FieldMap, description="Names of the fields in the input records.")
    test_file: Path | None = Field(None, description="Use this file as the test split instead of splitting the input.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share of each category held out as the test split.")
    max_test: int | None = Field(None, ge=1, description="Cap on test examples (stratified); None keeps all.")
    categories: list[str] | None = Field(None, description="Keep only these categories; None keeps all.")
    default_category: str = Field("default", description="Category for records that have none.")
    tokenizer: str | None = Field(
        None, description="Tokenizer (local dir) for token-length stats; None reports characters only."
    )
    response_format: dict[str, Any] | None = Field(
        None,
        description="The task's OpenAI response_format (json_object, or json_schema with its schema), for records "
        "that carry none: references are validated against it, inference and serving enforce it.",
    )


# -------------------------------------------------------------------------- service
class Price(Strict):
    input_per_mtok: float = Field(..., ge=0, description="USD per million input tokens.")
    output_per_mtok: float = Field(..., ge=0, description="USD per million output tokens.")


DEFAULT_PRICES: dict[str, dict[str, float]] = {
    # USD per million tokens, list prices as published by the providers (2025).
    "gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
    "gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
    "gpt-4.1": {"input_per_mtok": 2.0, "output_per_mtok": 8.0},
    "gpt-4.1-mini": {"input_per_mtok": 0.4, "output_per_mtok": 1.6},
    "claude-3-5-sonnet-latest": {"input_per_mtok": 3.0, "output_per_mtok": 15.0},
    "claude-sonnet-4-5": {"input_per_mtok": 3.0, "output_per_mtok": 15.0},
    "claude-3-5-haiku-latest": {"input_per_mtok": 0.8, "output_per_mtok": 4.0},
    "gemini-1.5-flash": {"input_per_mtok": 0.075, "output_per_mtok": 0.3},
    "gemini-2.5-flash": {"input_per_mtok": 0.3, "output_per_mtok": 2.5},
    "gemini-2.5-pro": {"input_per_mtok": 1.25, "output_per_mtok": 10.0},
}


class ServiceConfig(Strict):
    provider: Literal["openai", "anthropic"] = Field(
        "openai", description="'openai' = any OpenAI-compatible endpoint; 'anthropic' = native Messages API."
    )
    base_url: str | None = Field(None, description="Endpoint base URL, e.g. http://127.0.0.1:8000/v1; None = provider default.")
    model: str = Field("gpt-4o-mini", description="Service model used for synthesis (and judging unless judge.model is set).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Name of the environment variable holding the API key.")
    concurrency: int = Field(8, ge=1, description="Maximum service calls in flight.")
    rpm: int | None = Field(None, ge=1, description="Requests-per-minute budget; None = unlimited.")
    tpm: int | None = Field(None, ge=1, description="Tokens-per-minute budget; None = unlimited.")
    max_retries: int = Field(5, ge=0, description="Retries per call on 429, 5xx, timeouts and connection errors.")
    json_retries: int = Field(2, ge=0, description="Extra calls when a reply is not valid JSON for its schema.")
    timeout_s: float = Field(60.0, gt=0, description="Per-call timeout in seconds.")
    backoff_base_s: float = Field(1.0, gt=0, description="First backoff delay; doubles per retry, with jitter.")
    backoff_max_s: float = Field(60.0, gt=0, description="Cap on one backoff delay.")
    structured_output: Literal["json_schema", "json_object", "json_object_schema", "prompt"] = Field(
        "json_object",
        description="How JSON replies are requested: json_schema (strict schema; switches to json_object_schema by "
        "itself when the server says json_schema is unsupported), json_object_schema (json_object with a `schema` "
        "key, as llama.cpp's server constrains it), json_object (no schema sent), prompt (the prompt alone).",
    )
    prices: dict[str, Price] = Field(
        default_factory=lambda: {k: Price(**v) for k, v in DEFAULT_PRICES.items()},
        description="USD prices per model; models not listed are costed at 0 and flagged.",
    )
    max_usd: float | None = Field(None, gt=0, description="Budget in USD for the whole run; the loop stops cleanly when reached.")
    max_tokens: int | None = Field(None, gt=0, description="Budget in service tokens for the whole run.")
    use_batch: bool = Field(
        False, description="Send bulk synthesis and judging through the provider's Batch API at its discount (slower, cheaper)."
    )
    batch_discount: float = Field(
        0.5, gt=0, le=1, description="Price factor applied to Batch API calls (OpenAI bills batches at half price)."
    )
    batch_max_requests: int = Field(
        50_000, ge=1, description="Most requests in one provider batch (OpenAI: 50,000); larger jobs are split into several."
    )
    batch_max_bytes: int = Field(
        200_000_000, ge=1, description="Largest input file of one provider batch in bytes (OpenAI: 200 MB); larger jobs are split."
    )
    max_failed_share: float = Field(
        0.5, ge=0, lt=1,
        description="A judge, baseline or synthesis stage whose calls failed (after retries) beyond this share is "
        "recorded failed, not done, and the loop stops (service_unavailable); a rerun retries exactly those calls.",
    )

    _key_env = field_validator("api_key_env")(env_var_name)
    _url = field_validator("base_url")(http_url)


# ---------------------------------------------------------------------------- judge
JUDGE_METRICS = ("similarity", "precision")
# Exact metrics of a structured task (`exact.py`), each a share of candidates in [0, 1].
EXACT_METRICS = ("json_valid", "schema_valid", "tool_name_match", "arguments_exact", "field_accuracy")
Metric = Literal["similarity", "precision", "json_valid", "schema_valid", "tool_name_match", "arguments_exact",
                 "field_accuracy"]
Statistic = Literal["mean", "median", "coverage@50", "coverage@70"]


def _check_range(metric: str, statistic: str, threshold: float) -> None:
    """The threshold must be a value the statistic can take: 0-1 for an exact metric, 1-100 for a judge score."""
    if metric in EXACT_METRICS:
        if statistic.startswith("coverage@"):
            raise ValueError(f"{statistic} is a statistic of judge scores (1-100); {metric} is a share of candidates "
                             "in 0-1: use statistic mean (or median)")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold {threshold:g} is outside {metric}'s range 0-1 (a share of candidates, "
                             "e.g. 0.99)")
    elif statistic in ("mean", "median") and threshold < 1:
        raise ValueError(f"threshold {threshold:g} is below the {statistic} score's range 1-100")


class PassCondition(Strict):
    """One more absolute condition a round must meet (`pass_rule.also`)."""

    metric: Metric = Field(description="Judged metric (similarity, precision) or exact metric of a structured task "
                           "(json_valid, schema_valid, tool_name_match, arguments_exact, field_accuracy).")
    statistic: Statistic = Field("mean", description="Statistic of the per-candidate values (exact metrics: mean or median).")
    threshold: float = Field(ge=0, le=100, description="The statistic must reach this: 1-100 for a judge score, percent "
                             "for coverage, 0-1 for an exact metric.")

    @model_validator(mode="after")
    def _threshold_in_range(self) -> PassCondition:
        _check_range(self.metric, self.statistic, self.threshold)
        return self


class PassRule(Strict):
    metric: Metric = Field("precision", description="Metric the rule reads: judged (similarity, precision) or exact "
                           "(json_valid, schema_valid, tool_name_match, arguments_exact, field_accuracy; a share 0-1).")
    statistic: Statistic = Field(
        "mean", description="Statistic of the per-candidate scores (exact metrics: mean or median)."
    )
    threshold: float = Field(70.0, ge=0, le=100, description="Absolute target (score 1-100, coverage in percent, "
                             "exact metric 0-1).")
    relative_to_service: float | None = Field(
        None, gt=0, description="If set (e.g. 0.95), pass when local ÷ service-baseline statistic reaches it."
    )
    also: list[PassCondition] = Field(
        default_factory=list,
        description="More absolute conditions, each of which must hold too (e.g. [{metric: schema_valid, threshold: "
        "0.99}]); a metric not measured fails its condition.",
    )

    @model_validator(mode="after")
    def _threshold_in_range(self) -> PassRule:
        if self.relative_to_service is None or self.metric not in EXACT_METRICS:
            _check_range(self.metric, self.statistic, self.threshold)
        elif self.statistic.startswith("coverage@"):
            _check_range(self.metric, self.statistic, 0.0)
        return self

    def judged(self) -> PassRule:
        """The judge's part of the rule, for what reads judge scores only (calibration, probes, drift, review):
        the rule itself when its metric is judged, else its first judged `also` condition, else the default."""
        if self.metric in JUDGE_METRICS:
            return self
        cond = next((c for c in self.also if c.metric in JUDGE_METRICS), None)
        return PassRule() if cond is None else PassRule(metric=cond.metric, statistic=cond.statistic,
                                                        threshold=cond.threshold)


class JudgeConfig(Strict):
    model: str | None = Field(None, description="Judge model; None = service.model.")
    judgments_per_candidate: int = Field(10, ge=1, description="M: judge calls per candidate (the paper's 10).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of judge calls (varies the M judgments).")
    max_tokens: int = Field(512, ge=16, description="Max tokens of one judge reply.")
    template: Path | None = Field(None, description="Override the judge Jinja template.")
    pass_rule: PassRule = Field(default_factory=PassRule, description="When a round counts as passed.")
    max_test_prompts: int | None = Field(None, ge=1, description="Judge only this many test prompts; None = all.")
    panel: list[str] = Field(
        default_factory=list, description="Several judge models; scores averaged, agreement reported."
    )
    min_valid: float = Field(
        0.5, ge=0, le=1,
        description="Stop the loop (judge_failed) when fewer than this share of judge replies are valid judgments.",
    )
    require_kappa: float | None = Field(
        None, ge=-1, le=1,
        description="If set, a round passes only when `llamaduo calibrate` found the judge's pass/fail agreeing with "
        "people's labels at Cohen's kappa ≥ this (calibration.json); None = no calibration required.",
    )


# ---------------------------------------------------------------------------- synth
class SynthConfig(Strict):
    model: str | None = Field(None, description="Generator model; None = service.model.")
    per_round: int = Field(100, ge=1, description="Synthetic pairs requested in the first synthesis round.")
    growth: Literal["fixed", "double"] = Field("fixed", description="'double' doubles per_round each round (paper sweep).")
    max_per_round: int = Field(256_000, ge=1, description="Cap for the growth schedule.")
    pairs_per_call: int = Field(5, ge=1, description="Pairs asked for in one synthesis call.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of synthesis calls.")
    max_tokens: int = Field(2048, ge=16, description="Max tokens of one synthesis reply.")
    topics: dict[str, str] = Field(default_factory=dict, description="Topic text per category; default = the category name.")
    template: Path | None = Field(None, description="Override the synthesis Jinja template.")
    min_chars: int = Field(2, ge=1, description="Reject instructions/responses shorter than this.")
    max_chars: int = Field(8000, ge=1, description="Reject instructions/responses longer than this.")


# ---------------------------------------------------------------------------- dedup
class DedupConfig(Strict):
    num_perm: int = Field(128, ge=16, description="MinHash permutations.")
    shingle: int = Field(1, ge=1, description="Words per MinHash shingle (1 = word sets).")
    jaccard: float = Field(0.9, gt=0, le=1, description="LSH Jaccard threshold proposing near-duplicate pairs.")
    rouge_l: float = Field(0.7, gt=0, le=1, description="A proposed pair is a near duplicate when ROUGE-L F1 exceeds this.")
    decontam_ngram: int = Field(13, ge=1, description="Drop new pairs sharing a run of this many words with a test item.")
    decontam_jaccard: float = Field(
        0.8, gt=0, le=1, description="Drop new pairs whose MinHash Jaccard estimate with a test item reaches this."
    )


# ---------------------------------------------------------------------------- model
class ModelConfig(Strict):
    base: str = Field("", description="Base model: local directory, GGUF file path, or Hub id (must be cached offline).")
    gguf_file: str | None = Field(None, description="GGUF file name inside `base` when base is a directory.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    chat_template: str | None = Field(
        None, description="Jinja chat template (text or path); None = the model's own, else ChatML."
    )
    cache_dir: Path | None = Field(None, description="Where converted GGUF->safetensors copies are cached.")


# ---------------------------------------------------------------------------- train
class TrainConfig(Strict):
    method: Literal["lora", "qlora", "full"] = Field("lora", description="Fine-tuning method.")
    lora_r: int | None = Field(None, ge=1, description="LoRA rank; None = paper schedule by data size (8/16/32).")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha; None = 2 × rank.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules LoRA adapts.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("cosine", description="Transformers scheduler name.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up.")
    epochs: float = Field(1.0, gt=0, description="Epochs over the round's training set.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(4, ge=1, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(1024, ge=16, description="Truncate chat-formatted examples to this many tokens.")
    packing: bool = Field(False, description="Pack examples into max_length rows (best-fit), padding-free.")
    padding_free: bool | Literal["auto"] = Field(
        "auto",
        description="Concatenate each batch into one row without padding (position ids keep examples apart); "
        "'auto' = on with CUDA's variable-length attention, off on CPU where a packed row's attention costs "
        "its length squared.",
    )
    group_by_length: bool = Field(True, description="Batch examples of similar length together to cut padding.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Compute precision: 'auto' = bf16 mixed precision where the hardware computes bf16 natively "
        "(CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    continue_from_previous: bool = Field(False, description="Start each round from the previous round's adapter.")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the train set held out for validation loss.")
    save_steps: int | None = Field(
        200, ge=1, description="Checkpoint every N optimizer steps, so a killed round resumes there; None = never."
    )
    logging_steps: int = Field(10, ge=1, description="Log the loss every N steps.")


# ---------------------------------------------------------------------------- infer
class VLLMConfig(Strict):
    """How the vLLM backend lays the infer stage over GPUs (ignored by the transformers backend)."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine shards each layer over.")
    pipeline_parallel_size: int = Field(1, ge=1, description="GPUs one engine splits the layers over (in stages).")
    data_parallel_size: int = Field(
        1, ge=1, description="Engines, each in its own process on its own tensor × pipeline GPUs, each answering "
        "a shard of the test prompts.",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may take.")
    max_model_len: int | None = Field(None, ge=1, description="Context length of the engine; None = the model's.")
    enforce_eager: bool = Field(False, description="Skip CUDA graphs (less memory, slower decoding).")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="How one engine's tensor/pipeline workers run: processes ('mp') or Ray (across nodes); "
        "None = vLLM's choice.",
    )


class InferConfig(Strict):
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="'auto' = vLLM when installed with CUDA, else transformers."
    )
    num_samples: int = Field(4, ge=1, description="K: sampled candidates per test prompt (the paper's 4).")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(1024, ge=1, description="Max generated tokens per candidate.")
    batch_size: int = Field(8, ge=1, description="Prompts per generation batch (at most).")
    batch_tokens: int | None = Field(
        None, ge=1,
        description="Cap on a batch's cache: prompts × longest prompt + prompts × K × max_new_tokens tokens; "
        "length-sorted batches close early rather than exceed it (a longer prompt runs alone). None = batch_size only.",
    )
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="Parallel layout of the vLLM backend.")
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto",
        description="Weights for generation: 'auto' = bf16 when sampling where the hardware computes bf16 "
        "natively and the model has 50M+ parameters (model.dtype float32); greedy stays fp32 so its answers "
        "do not depend on the batch. 'int8' = every linear layer (LM head included) as int8 weights over bf16 "
        "activations, CPU and transformers only; a round's LoRA adapter is merged first, as deploy exports it.",
    )
    int4_lm_head: bool = Field(False, description="With precision int8: the LM head as int4, a bf16 scale and zero "
                               "per 32 weights (Gemma 3 270M, 2 cores: head 5.8 vs 16.7 ms a token; next token as "
                               "fp32's on 98.0 % of tokens, int8: 98.3 %; mean KL 0.019 vs 0.0035).")

    @model_validator(mode="after")
    def _vllm_layout_needs_vllm(self) -> InferConfig:
        if self.backend == "transformers" and self.vllm != VLLMConfig():
            raise ValueError("infer.vllm sets a GPU layout, which infer.backend=transformers does not use; "
                             "set infer.backend to vllm or auto, or remove infer.vllm")
        if self.backend == "vllm" and self.precision == "int8":
            raise ValueError("infer.precision=int8 is int8 weights for CPU generation on transformers; vLLM "
                             "quantizes through its own settings: set infer.precision to auto or bf16")
        if self.int4_lm_head and self.precision != "int8":
            raise ValueError(f"infer.int4_lm_head is part of infer.precision=int8 (set: {self.precision}); "
                             "set infer.precision to int8 or remove infer.int4_lm_head")
        return self


# ----------------------------------------------------------------------------- loop
class LoopConfig(Strict):
    max_rounds: int = Field(3, ge=1, description="Rounds including round 0 (training on coverage data only).")
    min_delta: float = Field(0.0, ge=0, description="Improvement of the pass statistic that counts as progress.")
    patience: int | None = Field(None, ge=1, description="Stop after this many rounds without min_delta progress.")
    max_wall_s: float | None = Field(None, gt=0, description="Wall-clock limit for the whole run in seconds.")


class TrackingConfig(Strict):
    backend: Literal["none", "mlflow"] = Field(
        "none", description="Experiment tracking: 'mlflow' logs every round's settings, data, scores, cost and report."
    )
    uri: str | None = Field(
        None, description="MLflow tracking URI; None = a local file store, runs_dir/mlruns."
    )
    experiment: str | None = Field(None, description="MLflow experiment name; None = 'llamaduo'.")


