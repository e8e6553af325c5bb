"""A GGUF file's header, read and rewritten without llama.cpp: its metadata, and the SentencePiece
model behind a llama-style vocabulary.

gguf's `GGUFReader` decodes every array element into Python objects, which takes minutes for a
256k-token vocabulary on a small CPU; these walk the header only and copy tensors byte for byte.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from llamaduo.errors import UserError


class GGUFFormatError(UserError):
    """A file that is not a GGUF."""


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
        raise GGUFFormatError("not a GGUF file")
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


def _entries(path: Path) -> dict[str, bytes]:
    """Every metadata entry of a GGUF as its raw bytes (key, type and value), by key."""
    import mmap

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return {k: bytes(mm[a:b]) for k, _, a, _, b in _walk(mm)[0]}


def rewrite_metadata(src: Path, out: Path, set_bool: dict[str, bool] | None = None, remove: tuple[str, ...] = (),
                     take_from: Path | None = None, take: tuple[str, ...] = ()) -> None:
    """Copy a GGUF with metadata entries removed, boolean ones set, or the entries `take` copied
    as they are (type and value) from the GGUF `take_from`; tensors are copied byte for byte."""
    import mmap

    set_bool = set_bool or {}
    taken = {k: v for k, v in _entries(take_from).items() if k in take} if take_from is not None else {}
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
        replaced = set(remove) | set(set_bool) | set(taken)
        kept = [bytes(mm[a:b]) for k, _, a, _, b in entries if k not in replaced]
        for k, v in set_bool.items():
            kept.append(struct.pack("<Q", len(k.encode())) + k.encode() + struct.pack("<I?", 7, v))
        kept += list(taken.values())
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


