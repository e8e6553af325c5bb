"""`llamaduo.yaml` as a file on disk.

Loading reports YAML errors with their line and resolves relative paths against the file's
folder; `example_yaml` writes the commented example `llamaduo init` starts from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from llamaduo.config import Config, ConfigError, from_dict


def load_config(path: Path | str, overrides: list[str] | None = None) -> Config:
    """Load and validate a YAML config. Relative paths in it resolve against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    cfg = from_dict(tree, overrides, source=str(path))
    return resolve_paths(cfg, path.parent)


def resolve_paths(cfg: Config, base: Path) -> Config:
    """Make file paths in the config relative to the config file's folder, not the cwd."""

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    cfg = cfg.model_copy(deep=True)
    cfg.runs_dir = fix(cfg.runs_dir)
    cfg.data.input = fix(cfg.data.input)
    cfg.data.test_file = fix(cfg.data.test_file)
    cfg.judge.template = fix(cfg.judge.template)
    cfg.synth.template = fix(cfg.synth.template)
    if cfg.model.base and not cfg.model.base.startswith(("hf:",)):
        cand = base / cfg.model.base
        if not Path(cfg.model.base).is_absolute() and cand.exists():
            cfg.model.base = str(cand)
    return cfg


def example_yaml() -> str:
    """A commented example config: every field with its description and default."""
    lines = [
        "# llamaduo.yaml — every setting with its default. Delete what you do not change.",
        "# Secrets are never written here: name the environment variable that holds them.",
        "",
    ]

    def walk(model: type[BaseModel], indent: int, instance: BaseModel) -> None:
        pad = "  " * indent
        for name, field in model.model_fields.items():
            value = getattr(instance, name)
            if field.description:
                lines.append(f"{pad}# {field.description}")
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:")
                walk(type(value), indent + 1, value)
            else:
                value = _jsonable(value)
                if isinstance(value, dict) and value:
                    dumped = yaml.safe_dump({name: value}, default_flow_style=None, sort_keys=False).rstrip()
                    lines.extend(pad + ln for ln in dumped.splitlines())
                else:  # JSON is valid YAML and keeps one setting on one line
                    lines.append(f"{pad}{name}: {json.dumps(value, ensure_ascii=False)}")

    walk(Config, 0, Config())
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
