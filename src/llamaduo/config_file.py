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


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(path: Path | str, overrides: list[str] | None = None) -> Config:
    """Load and validate a YAML config. Relative paths in it resolve against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; give the config file (e.g. {path / 'llamaduo.yaml'})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        tree = yaml.load(text, Loader=UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
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
