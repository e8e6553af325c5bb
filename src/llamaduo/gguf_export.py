"""The GGUFs `deploy` writes, and which of them ships.

From the merged model, llama.cpp's converter writes the unquantized GGUF (`deploy.gguf_type`) and
its quantizer each of `deploy.quantize` from that. One case is different: a LoRA round trained on
a base that is itself a quantized GGUF (the packaged Gemma 3 270M is Q4_K_M). Re-quantizing the
merged weights to the base's own kind puts them back on the base's grid (measured on Gemma: 97 % of
the quantized bytes came out identical to the base's, and the answers were the base's), so for
that kind deploy writes the base's own tensors, under the fine-tuned model's metadata (chat
template, end-of-turn token), plus the adapter as a GGUF LoRA (llama.cpp's
`convert_lora_to_gguf.py`) that llama.cpp (`--lora`) and Ollama (`ADAPTER`) apply at load time.
The weights then are exactly those the adapter was trained against.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llamaduo import gguf as gguf_tools
from llamaduo.artifacts import GGUFFile
from llamaduo.config import Config
from llamaduo.errors import UserError
from llamaduo.gguf_meta import chat_template, metadata, spm_model_from_gguf
from llamaduo.store import RunStore

# general.file_type of a GGUF → the quantization it is (llama.cpp's LLAMA_FTYPE_MOSTLY_*)
_FILE_TYPES = {7: "q8_0", 18: "q6_k", 17: "q5_k_m", 16: "q5_k_s", 8: "q5_0", 9: "q5_1", 15: "q4_k_m", 14: "q4_k_s",
               2: "q4_0", 3: "q4_1", 13: "q3_k_l", 12: "q3_k_m", 11: "q3_k_s", 10: "q2_k"}


def base_gguf(cfg: Config) -> Path | None:
    """The GGUF file the student was loaded from (transformers dequantises it), or None."""
    base = Path(cfg.model.base)
    path = base / cfg.model.gguf_file if base.is_dir() and cfg.model.gguf_file else base
    return path if path.suffix == ".gguf" and path.is_file() else None


def base_quantization(cfg: Config) -> str | None:
    """The quantization of the GGUF the student was fine-tuned from, or None."""
    path = base_gguf(cfg)
    if path is None:
        return None
    try:
        return _FILE_TYPES.get(int(metadata(path).get("general.file_type", -1)))
    except (OSError, ValueError, TypeError, UserError):
        return None


def over_base_kind(cfg: Config, adapter: Path) -> str | None:
    """The requested quantization written as the base's own file plus the round's LoRA, or None."""
    kind = base_quantization(cfg)
    if not cfg.deploy.adapter_over_base or kind not in cfg.deploy.quantize:
        return None
    return kind if (adapter / "adapter_config.json").exists() else None


def ship_kind(cfg: Config, over_base: str | None = None) -> tuple[str, str | None]:
    """The GGUF that ships (the Modelfile's FROM, what the gate judges), and why when it is not the default.

    Re-quantized to the quantization of its base, a fine-tuned model loses its fine-tuning (see the
    module doc); unless that kind is written as base + LoRA (`over_base`), the next finer requested
    kind ships instead, unless `deploy.ship` names one."""
    default = cfg.deploy.shipped
    if cfg.deploy.ship is not None or default != base_quantization(cfg) or default == over_base:
        return default, None
    bits = {k: int(k[1]) for k in _FILE_TYPES.values()}
    finer = sorted((k for k in cfg.deploy.quantize if bits[k] > bits[default]), key=lambda k: -bits[k])
    instead = finer[0] if finer else cfg.deploy.gguf_type
    return instead, (f"{instead} ships, not {default}: the base model is itself {default}, and re-quantizing the "
                     f"fine-tuned weights to {default} puts most of them back on the base's values (the fine-tuning "
                     f"is lost); set deploy.ship to choose")


def sentencepiece_model(cfg: Config, adapter: Path) -> bytes | None:
    """The SentencePiece model behind the tokenizer, if it has one: saved next to the adapter or the base,
    or rebuilt from a GGUF base's llama-style vocabulary (transformers keeps only tokenizer.json)."""
    from llamaduo import models

    gguf_file = base_gguf(cfg)
    if gguf_file is not None:
        return spm_model_from_gguf(gguf_file)
    for d in (adapter, models.resolve_base(cfg.model)):
        if isinstance(d, Path) and (d / "tokenizer.model").is_file():
            return (d / "tokenizer.model").read_bytes()
    return None


def _seconds(t: float) -> float:
    return float(f"{time.monotonic() - t:.1f}")


def export_ggufs(cfg: Config, store: RunStore, adapter: Path) -> tuple[list[GGUFFile], str | None]:
    """The unquantized GGUF, then each quantization; a failure is recorded, never raised."""
    base_kind = cfg.deploy.gguf_type
    over = over_base_kind(cfg, adapter)
    store.gguf_adapter_path(base_kind).unlink(missing_ok=True)  # an earlier deploy's adapter must not pass for this one's
    files: list[GGUFFile] = []
    script = gguf_tools.find_converter()
    source = gguf_tools.converter_source(script) if script else None

    def attempt(kind: str, make: Any, note: str | None = None) -> GGUFFile:
        out = store.gguf_path(kind)
        out.unlink(missing_ok=True)  # a stale file from an earlier deploy must not pass for this one
        t = time.monotonic()
        try:
            lora = make(out)
            if not chat_template(out):
                out.unlink(missing_ok=True)
                raise gguf_tools.GGUFError(
                    "written without tokenizer.chat_template in its metadata (llama.cpp would guess another format)")
        except UserError as e:
            return GGUFFile(kind=kind, status="failed", error=str(e), seconds=_seconds(t))
        size = out.stat().st_size + (store.deploy_dir / lora).stat().st_size if lora else out.stat().st_size
        return GGUFFile(kind=kind, status="ok", file=out.name, adapter=lora, size_bytes=size, chat_template=True,
                        seconds=_seconds(t), note=note)

    def over_base(out: Path) -> str:
        lora = store.gguf_adapter_path(base_kind)
        gguf_tools.convert_lora(adapter, store.merged_dir, lora, base_kind)
        gguf_tools.with_metadata_of(base_gguf(cfg), store.gguf_path(base_kind), out)  # type: ignore[arg-type]
        return lora.name

    first = attempt(base_kind, lambda out: gguf_tools.convert(store.merged_dir, out, base_kind))
    files.append(first)
    for kind in cfg.deploy.quantize:
        if first.status != "ok":
            files.append(GGUFFile(kind=kind, status="failed", error=f"needs the {base_kind} GGUF, which failed"))
        elif kind == over:
            files.append(attempt(kind, over_base, note=f"the base's own {kind} weights with the round's LoRA "
                                                       f"adapter ({base_kind}), applied by the runtime at load time"))
        else:
            src = store.gguf_path(base_kind)
            files.append(attempt(kind, lambda out, kind=kind, src=src: gguf_tools.quantize(src, out, kind)))
    return files, source
