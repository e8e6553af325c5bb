"""The one config schema for `llamaduo.yaml`, and validating a config tree with `--set` overrides.

Every default is declared once, here, with a description. Secrets never live in the
config: only the *names* of environment variables that hold them. Reading the YAML file
and writing the commented example are in `config_file.py`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from llamaduo.config.sections import (
    DEFAULT_PRICES,
    EXACT_METRICS,
    JUDGE_METRICS,
    ConfigError,
    DataConfig,
    DedupConfig,
    FieldMap,
    InferConfig,
    JudgeConfig,
    LoopConfig,
    ModelConfig,
    PassCondition,
    PassRule,
    Price,
    ServiceConfig,
    Strict,
    SynthConfig,
    TrackingConfig,
    TrainConfig,
    VLLMConfig,
)
from llamaduo.config.serving import DeployConfig, ServeConfig

__all__ = [
    "DEFAULT_PRICES", "EXACT_METRICS", "JUDGE_METRICS", "Config", "ConfigError", "DataConfig", "DedupConfig", "DeployConfig",
    "FieldMap", "InferConfig", "JudgeConfig", "LoopConfig", "ModelConfig", "PassCondition", "PassRule", "Price", "ServeConfig",
    "ServiceConfig", "Strict", "VLLMConfig",
    "SynthConfig", "TrackingConfig", "TrainConfig", "apply_overrides", "dump_config", "format_validation_error", "from_dict",
]


# ---------------------------------------------------------------------------- root
class Config(Strict):
    name: str = Field("llamaduo-run", description="Run name; the run directory is runs_dir/name.")
    runs_dir: Path = Field(Path("runs"), description="Parent directory of run directories.")
    seed: int = Field(0, description="Seed for splits, sampling and training.")
    data: DataConfig = Field(default_factory=DataConfig, description="Coverage data.")
    service: ServiceConfig = Field(default_factory=ServiceConfig, description="The service LLM.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="LLM-as-judge protocol.")
    synth: SynthConfig = Field(default_factory=SynthConfig, description="Synthetic data generation.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Deduplication and test decontamination of synthetic data.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The local (student) model.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Fine-tuning.")
    infer: InferConfig = Field(default_factory=InferConfig, description="Batch inference on the test split.")
    loop: LoopConfig = Field(default_factory=LoopConfig, description="Rounds and stop rules.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment tracking (MLflow).")
    deploy: DeployConfig = Field(default_factory=DeployConfig, description="Export.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="OpenAI-compatible server.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or v in {".", ".."}:
            raise ValueError("must be a plain directory name")
        return v

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name

    @property
    def judge_model(self) -> str:
        return self.judge.model or self.service.model

    @property
    def synth_model(self) -> str:
        return self.synth.model or self.service.model


# ----------------------------------------------------------------- overrides / dump
def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides; values are parsed as YAML so numbers and lists work."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def format_validation_error(err: ValidationError, source: str, overridden: list[str] | None = None) -> str:
    """One line per problem, blamed on `--set KEY` when an override set that setting, else on `source`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        by = next((k for k in overridden or [] if k == loc or k.startswith(loc + ".") or loc.startswith(k + ".")), None)
        where = (f"--set {by}" if by == loc else f"--set {by}: {loc}") if by else f"{source}: {loc}"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def from_dict(tree: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> Config:
    overridden = [o.split("=", 1)[0].strip() for o in overrides or [] if "=" in o]
    tree = apply_overrides(tree, overrides or [])
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, overridden)) from None


def dump_config(cfg: Config) -> str:
    """YAML of the resolved config. It holds env-var names only, never secret values."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
