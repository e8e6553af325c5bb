"""The sections of the config schema for what happens after the loop: deploy and serve."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from llamaduo.config.sections import Strict, env_var_name

# --------------------------------------------------------------------------- deploy
GGUFQuant = Literal[
    "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k",
]


class DeployConfig(Strict):
    formats: list[Literal["hf", "gguf", "ollama"]] = Field(
        default_factory=lambda: ["hf", "gguf", "ollama"],
        description="Artifacts to export; 'gguf' needs the interop extra (llama-cpp-python) and its converter.",
    )
    gguf_type: Literal["f32", "f16", "bf16"] = Field(
        "f16", description="Type of the unquantized GGUF llama.cpp's converter writes (the quantized ones are made from it)."
    )
    quantize: list[GGUFQuant] = Field(
        default_factory=lambda: ["q8_0", "q4_k_m"],
        description="Quantized GGUFs made from it with llama.cpp's quantizer (llama_model_quantize).",
    )
    ship: str | None = Field(
        None,
        description="The GGUF the Modelfile points at and `accept`'s gate judges: gguf_type or one of quantize; "
        "None = the last of quantize (else gguf_type).",
    )
    adapter_over_base: bool = Field(
        True,
        description="When the base is itself a quantized GGUF of one of `quantize` and the round a LoRA adapter, "
        "write that kind as the base's own file plus the adapter as a GGUF LoRA (applied by llama.cpp / Ollama at "
        "load time) instead of re-quantizing the merged weights, which puts them back on the base's values.",
    )
    max_drop: float = Field(
        2.0, ge=0,
        description="Gate of `accept`: the shipped artifact is rejected when its pass statistic is below the best "
        "round's by more than this many points beyond the 95% CI of the difference.",
    )
    num_ctx: int | None = Field(
        None, ge=16,
        description="Context length of the llama.cpp server and Ollama's num_ctx; None = train.max_length + "
        "infer.max_new_tokens, capped at the model's positions.",
    )

    @field_validator("ship")
    @classmethod
    def _known_kind(cls, v: str | None, info: Any) -> str | None:
        kinds = [info.data.get("gguf_type"), *(info.data.get("quantize") or [])]
        if v is not None and v not in kinds:
            raise ValueError(f"must be one of the GGUFs written: {', '.join(k for k in kinds if k)}")
        return v

    @property
    def shipped(self) -> str:
        """The GGUF kind the Modelfile points at and the gate judges."""
        return self.ship or (self.quantize[-1] if self.quantize else self.gguf_type)


class ServeConfig(Strict):
    host: str = Field("127.0.0.1", description="Bind address; loopback unless told otherwise.")
    port: int = Field(8000, ge=0, le=65535, description="Port; 0 picks a free one.")
    api_key_env: str | None = Field(None, description="Env var holding the bearer key clients must send; None = open.")

    _key_env = field_validator("api_key_env")(env_var_name)
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest accepted request body.")
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    max_batch: int = Field(8, ge=1, description="Concurrent requests generated together.")
    batch_wait_ms: float = Field(10.0, ge=0, description="How long to gather a batch.")
    stream_interval_ms: float = Field(
        25.0, ge=0,
        description="A stream's tokens decoded within this long of its last chunk go out together, so a stream gets "
        "at most a chunk this often (a model slower than that sends every token alone; first and last tokens go out "
        "at once); 0 = every token alone. Each chunk costs the server's loop and the client a wake-up and a write "
        "while the generation thread waits (tiny model, 2 cores: overhead over direct generation 13.8 % at 10 ms, "
        "7.1 % at 25 ms).",
    )
    prefix_cache_mb: float = Field(
        64.0, ge=0,
        description="Keys and values of recent prompts kept for the next prompts that start the same way (a shared "
        "system prompt, tool list or chat history is then not prefilled again); least recently used go first beyond "
        "this many MB; 0 = off.",
    )
    fallback: bool = Field(False, description="Forward to the service LLM when the local model fails or is slow.")
    latency_budget_s: float | None = Field(None, gt=0, description="Fallback when local generation exceeds this.")
    request_timeout_s: float | None = Field(
        300.0, gt=0,
        description="Deadline of one request: past it the request leaves the batch and is answered 504 timeout "
        "(a stream ends with a timeout error event); None = no deadline.",
    )
    metrics_public: bool = Field(
        False, description="Serve /metrics without the API key (a scraper on a private network); by default it "
        "asks for the same bearer key as the API when one is set.",
    )
    shadow_rate: float = Field(
        0.0, ge=0, le=1, description="Share of live requests also sent to the service LLM off the request path and judged."
    )
    shadow_max_usd: float | None = Field(None, gt=0, description="Budget in USD for shadow answers and their judging.")
    shadow_queue: int = Field(1000, ge=1, description="Shadow work waiting at most; beyond it new work is dropped and counted.")
    shadow_batch: int = Field(16, ge=1, description="Stored pairs answered and judged together by the shadow worker.")
    monitor_window: int = Field(50, ge=2, description="Judged shadow pairs per monitoring window (drift is decided per window).")
    monitor_window_s: float | None = Field(
        None, gt=0, description="Monitoring windows by time instead: seconds per window; None = by count."
    )
    shadow_test_share: float = Field(
        0.2, ge=0, lt=1, description="Share of live traffic `run --from-shadow` holds out to extend the test split."
    )


