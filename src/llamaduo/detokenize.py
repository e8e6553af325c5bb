"""Text of a sequence as its tokens arrive, for streaming: only what can no longer change is sent.

The running sequence is detokenized whole each time (a token can change how the ones before it
read) and the new suffix is what goes out, holding back a trailing partial UTF-8 character
(decoded as U+FFFD), a tail that could be the start of a stop string, and whitespace (the final
text is stripped, as `infer.generate` strips it). Everything sent is a prefix of the final text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REPLACEMENT = "\ufffd"


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _stop_prefix_tail(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def whole_text(tokenizer: Any) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`; by the Rust tokenizer itself when that is all
    the Python wrapper would do (it cleans up no spaces): a stream decodes its text whole every token."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if callable(getattr(backend, "decode", None)) and getattr(tokenizer, "clean_up_tokenization_spaces", None) is False:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    """One generated sequence's text: `push` a token, get the newly settled text."""

    def __init__(self, tokenizer: Any, stops: list[str], decode: Callable[[list[int]], str] | None = None):
        """`decode`: `whole_text(tokenizer)`, made once for many streams."""
        self.decode = decode or whole_text(tokenizer)
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.sent = ""
        self.text = ""  # the whole decoded text so far (cut at a stop string once one appears)
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; returns text that is now certain. Sets `stopped` when a stop string appeared."""
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if self.stops:
            text, self.stopped = cut_at_stop(text, self.stops)
        self.text = text
        if self.stopped:
            return self.finish()
        safe = len(text) - _stop_prefix_tail(text, self.stops)
        while safe and text[safe - 1] == REPLACEMENT:
            safe -= 1
        return self._advance(text[:safe].strip())

    def finish(self) -> str:
        """The rest of the final text (at the end of the sequence)."""
        return self._advance(self.text.strip())

    @property
    def final(self) -> str:
        return self.text.strip()

    def _advance(self, visible: str) -> str:
        if len(visible) <= len(self.sent) or not visible.startswith(self.sent):
            return ""  # nothing new, or an earlier token re-read differently: wait for the end
        delta, self.sent = visible[len(self.sent):], visible
        return delta


def token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


_BYTES: dict[int, dict[int, bytes]] = {}  # per tokenizer (by id), per token: its bytes


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable stand-in of each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The bytes a token stands for, also when it holds only part of a UTF-8 character (which its
    decoded text shows as U+FFFD): byte-level BPE pieces and SentencePiece `<0xNN>` pieces are mapped back."""
    table = _BYTES.setdefault(id(tokenizer), {})
    if token not in table:
        text = token_text(tokenizer, token)
        piece = tokenizer.convert_ids_to_tokens(token)
        decoder = repr(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", ""))
        if REPLACEMENT in text and isinstance(piece, str):
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                text_bytes = bytes([int(piece[3:5], 16)])
            elif "ByteLevel" in decoder:
                inverse = _byte_decoder()
                text_bytes = bytes(inverse[c] for c in piece) if all(c in inverse for c in piece) else text.encode()
            else:
                text_bytes = text.encode()
        else:
            text_bytes = text.encode()
        table[token] = text_bytes
    return table[token]


def logprob_entry(tokenizer: Any, token: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
    """One `choices[].logprobs.content[]` item in OpenAI's shape."""

    def one(t: int, lp: float) -> dict[str, Any]:
        # A token the constraint ruled out has logprob -inf, which JSON cannot carry: -9999 as OpenAI sends.
        return {"token": token_text(tokenizer, t), "logprob": max(lp, -9999.0), "bytes": list(token_bytes(tokenizer, t))}

    return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}
