"""What `llamaduo serve` loads: one deployed model, or several runs' LoRA adapters on their one base.

One path that is a run directory (its `deploy/merged`) or a model directory is served as that
model. A LoRA adapter directory, or several paths, are served as adapters on a shared base: the
base is loaded once and each run's adapter (its best round's, as `deploy` would pick) is attached
under the run's name (PEFT `load_adapter`), so memory is one base plus the adapters, and the
scheduler batches requests for different adapters together (PEFT's mixed-adapter batches). A run
trained with method=full has no adapter to share a base with, and runs of different bases cannot
share one: both are refused naming the run. Each run answers with its own config's sampling
defaults, limits, auth and fallback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaduo.config import Config, InferConfig, ModelConfig, ServeConfig
from llamaduo.errors import UserError

if TYPE_CHECKING:
    from llamaduo.service import Client


@dataclass
class ServedModel:
    """One model name the server answers to."""

    name: str
    adapter: str | None = None  # the PEFT adapter name on the shared base; None = the model as loaded
    serve: ServeConfig | None = None  # its auth, limits and fallback (None: the server's)
    defaults: InferConfig | None = None  # sampling a request leaves out (None: the server's)
    fallback_client: Client | None = None
    fallback_model: str | None = None
    config: Config | None = None  # its run's whole config (judge protocol, target) for its own monitoring


def resolve_model_dir(model_or_run_dir: Path) -> tuple[Path, str]:
    """(model directory, served model name) for a run directory or a merged model directory."""
    from llamaduo.store import RunStore

    path = Path(model_or_run_dir)
    store = RunStore(path)
    if store.exists():
        merged = store.merged_dir
        if not (merged / "config.json").exists():
            raise UserError(f"{path}: no deployed model in {merged}; run `llamaduo deploy` first")
        return merged, path.resolve().name
    if not (path / "config.json").exists():
        raise UserError(f"{path}: neither a run directory nor a model directory (no config.json)")
    resolved = path.resolve()
    # runs/<name>/deploy/merged is served under the run's name.
    if resolved.name == "merged" and resolved.parent.name == "deploy":
        return path, resolved.parent.parent.name
    return path, resolved.name


@dataclass
class _Adapter:
    name: str
    path: Path
    cfg: Config
    base: str
    store_db: Path | None


def _fallback(cfg: Config, db: Path | None) -> Client | None:
    if not cfg.serve.fallback:
        return None
    from llamaduo.service import ServiceClient

    return ServiceClient(cfg.service, db_path=db)


def _adapter_of(path: Path, cfg: Config, overrides: list[str] | None, first: bool) -> _Adapter:
    """The LoRA adapter a path serves: a run's best round, or an adapter directory itself."""
    from llamaduo import models
    from llamaduo.store import RunStore

    store = RunStore(path)
    name = path.resolve().name
    if store.exists():
        from llamaduo.config_file import load_config
        from llamaduo.deploy import pick_round

        run_cfg = cfg if first or not store.config_path.exists() else load_config(store.config_path, overrides)
        adapter = store.adapter_dir(pick_round(store, None))
        base = str(models.resolve_base(run_cfg.model))
        db: Path | None = store.service_db
    elif (path / "adapter_config.json").exists():
        run_cfg, adapter, db = cfg, path, None
        base = str(json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or "")
    else:
        raise UserError(f"{path}: neither a run directory nor a LoRA adapter directory (no adapter_config.json); "
                        "a merged model is served alone")
    if not (adapter / "adapter_config.json").exists():
        if (adapter / "config.json").exists():
            raise UserError(f"{name}: trained with method=full (a whole model, no LoRA adapter), so it cannot share "
                            "a base with other runs; serve it alone")
        raise UserError(f"{name}: no trained adapter in {adapter}")
    return _Adapter(name, adapter, run_cfg, base, db)


def _same_base(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def load_served(paths: list[Path], cfg: Config, overrides: list[str] | None = None) -> tuple[Any, Any, list[ServedModel]]:
    """(model, tokenizer, served names) for `paths`; `cfg` is the first path's config."""
    from llamaduo import models
    from llamaduo.infer import for_generation

    if not paths:
        raise UserError("serve: name at least one run or model directory")
    if len(paths) == 1 and not (Path(paths[0]) / "adapter_config.json").exists():
        from llamaduo.store import RunStore

        model_dir, name = resolve_model_dir(paths[0])
        model, tokenizer = models.load_model(ModelConfig(base=str(model_dir), dtype=cfg.model.dtype))
        model = for_generation(model, cfg.infer)  # served in the precision the rounds were judged in
        store = RunStore(paths[0])
        fb = _fallback(cfg, store.service_db if store.exists() else None)
        return model, tokenizer, [ServedModel(name, None, cfg.serve, cfg.infer, fb, cfg.service.model, cfg)]
    adapters = [_adapter_of(Path(p), cfg, overrides, i == 0) for i, p in enumerate(paths)]
    names = [a.name for a in adapters]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UserError(f"serve: two runs are named {dup!r}; each served model needs its own name")
    first = adapters[0]
    for a in adapters[1:]:
        if not _same_base(a.base, first.base):
            raise UserError(f"{a.name}: fine-tuned from {a.base}, not {first.base} like {first.name}; runs served "
                            "together must share one base")
    base_cfg = first.cfg.model
    if first.base and Path(first.base).exists() and base_cfg.gguf_file is None:
        base_cfg = base_cfg.model_copy(update={"base": first.base})
    # The first adapter is PEFT's "default"; the others are loaded beside it under their run's name.
    model, tokenizer = models.load_model(base_cfg, adapter=first.path)
    served = [ServedModel(first.name, "default", first.cfg.serve, first.cfg.infer, _fallback(first.cfg, first.store_db),
                          first.cfg.service.model, first.cfg)]
    for a in adapters[1:]:
        model.load_adapter(str(a.path), adapter_name=a.name)
        served.append(ServedModel(a.name, a.name, a.cfg.serve, a.cfg.infer, _fallback(a.cfg, a.store_db),
                                  a.cfg.service.model, a.cfg))
    model.eval()
    return for_generation(model, first.cfg.infer), tokenizer, served
