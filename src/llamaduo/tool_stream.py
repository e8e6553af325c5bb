"""Streaming an answer that may call tools as OpenAI streams it: content as it is decoded, each call
as a first delta with its id, type, name and empty arguments, then its arguments in fragments as
they are decoded, and `finish_reason: tool_calls`.

The model writes calls as `<tool_call>` blocks (`tools.py`). Text that may still turn into a block
(a partial `<tool_call>` tag, a block whose head is not decoded yet) is held back; once a block's
head `{"name": "<offered>", "arguments": ` is decoded its call opens, and the arguments object
streams character by character until its braces close. A block that turns out not to be a call
to an offered function goes out as content, a bare `{"name": ..., "arguments": ...}` answer is
decided once it is whole, and later calls are dropped under `parallel_tool_calls: false` — so
the deltas add up to what `chat_api.read_tool_calls` makes of the same text answered whole.
A call cut off by `max_tokens` keeps the fragments already sent and ends with `length`, as
OpenAI's does.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from llamaduo.tools import CALL_HEAD, parse_tool_calls

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEAD = re.compile(re.escape(OPEN) + r"\s*" + CALL_HEAD.pattern)
_COMPACT_HEAD = OPEN + '{"name":"'  # a block's head up to its name, whitespace removed
_AFTER_NAME = '","arguments":'


def _head_possible(buf: str) -> bool:
    """Whether `buf` (starting with `<tool_call>`) can still grow into a call's head."""
    compact = re.sub(r"\s+", "", buf)
    if len(compact) <= len(_COMPACT_HEAD):
        return _COMPACT_HEAD.startswith(compact)
    if not compact.startswith(_COMPACT_HEAD):
        return False
    rest = compact[len(_COMPACT_HEAD):]
    quote = re.search(r'(?<!\\)"', rest)
    if quote is None:
        return True  # still inside the name
    tail = rest[quote.start():]
    return _AFTER_NAME.startswith(tail) or tail.startswith(_AFTER_NAME)


def _held_back(buf: str) -> int:
    """Length of the longest end of `buf` that may be the start of `<tool_call>`."""
    for n in range(min(len(buf), len(OPEN) - 1), 0, -1):
        if OPEN.startswith(buf[-n:]):
            return n
    return 0


class ToolCallStream:
    """One choice's decoded text in, its chunk deltas out (`{"content": ...}` / `{"tool_calls": [...]}`)."""

    def __init__(self, names: set[str], parallel: bool = True):
        self.names, self.parallel = names, parallel
        self.buf = ""
        self.state = "start"  # start | text | bare | head | block | args | tail
        self.calls = 0  # calls opened
        self.done_calls = 0  # calls whose block closed
        self._ws = ""  # whitespace after content, sent only if more content follows
        self._content = False  # content sent
        self._depth, self._in_string, self._escape = 0, False, False

    # ---------------------------------------------------------------- output
    def _text(self, text: str, out: list[dict[str, Any]]) -> None:
        """Content, with the answer's leading and trailing whitespace left out (as `read_tool_calls` strips it)."""
        if not self._content:
            text = text.lstrip()
        if not text:
            return
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        if body:
            out.append({"content": body})
            self._content = True

    def _open(self, name: str, out: list[dict[str, Any]]) -> None:
        out.append({"tool_calls": [{"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})
        self.calls += 1

    def _arguments(self, text: str, out: list[dict[str, Any]]) -> None:
        if text:
            out.append({"tool_calls": [{"index": self.calls - 1, "function": {"arguments": text}}]})

    def _whole_block(self, block: str, out: list[dict[str, Any]]) -> None:
        """A block read whole: its call (when it is one to an offered function), else content."""
        rest, calls = parse_tool_calls(block, self.names)
        if not calls:
            self._text(block, out)
            return
        if rest:
            self._text(rest, out)
        for call in calls:
            if self.parallel or self.calls == 0:
                self._open(call["function"]["name"], out)
                self._arguments(call["function"]["arguments"], out)
                self.done_calls += 1

    # ---------------------------------------------------------------- input
    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas `text` (the next decoded piece) completes."""
        self.buf += text
        out: list[dict[str, Any]] = []
        while self._step(out):
            pass
        return out

    def finish(self, reason: str) -> tuple[list[dict[str, Any]], str]:
        """The deltas still held back when the choice ends, and its finish reason."""
        out: list[dict[str, Any]] = []
        if self.state == "bare":
            self._whole_block(self.buf, out)
        elif self.state in ("start", "text", "head", "block"):
            self._text(self.buf, out)
        self.buf = ""
        # A call left open (cut off by max_tokens) ends the choice with the row's own reason.
        return out, ("tool_calls" if self.done_calls and self.done_calls == self.calls else reason)

    def _step(self, out: list[dict[str, Any]]) -> bool:
        """Advance as far as the buffer allows; True when another step may advance further."""
        buf = self.buf
        if self.state == "start":
            body = buf.lstrip()
            if not body:
                return False
            compact = re.sub(r"\s+", "", body)[: len('{"name"')]
            if '{"name"'.startswith(compact):
                if len(compact) < len('{"name"'):
                    return False
                self.state = "bare"  # perhaps a bare call: decided when the answer is whole
                return False
            self.state = "text"
            return True
        if self.state == "bare":
            return False
        if self.state == "text":
            at = buf.find(OPEN)
            if at < 0:
                keep = _held_back(buf)
                self._text(buf[: len(buf) - keep], out)
                self.buf = buf[len(buf) - keep:]
                return False
            self._text(buf[:at], out)
            self.buf, self.state = buf[at:], "head"
            return True
        if self.state == "head":
            head = _HEAD.match(buf)
            if head is not None:
                rest = buf[head.end():].lstrip()
                if not rest:
                    return False
                name = json.loads(f'"{head.group(1)}"')
                if rest[0] == "{" and name in self.names and (self.parallel or self.calls == 0):
                    self._open(name, out)
                    self.buf, self.state = rest, "args"
                    self._depth, self._in_string, self._escape = 0, False, False
                    return True
            elif _head_possible(buf) and CLOSE not in buf:
                return False
            self.state = "block"  # not a call we stream: read whole once closed
            return True
        if self.state == "block":
            end = buf.find(CLOSE)
            if end < 0:
                return False
            self._whole_block(buf[: end + len(CLOSE)], out)
            self.buf, self.state = buf[end + len(CLOSE):], "text"
            return True
        if self.state == "args":
            for i, ch in enumerate(buf):
                if self._in_string:
                    if self._escape:
                        self._escape = False
                    elif ch == "\\":
                        self._escape = True
                    elif ch == '"':
                        self._in_string = False
                elif ch == '"':
                    self._in_string = True
                elif ch in "{[":
                    self._depth += 1
                elif ch in "}]":
                    self._depth -= 1
                    if self._depth == 0:
                        self._arguments(buf[: i + 1], out)
                        self.buf, self.state = buf[i + 1:], "tail"
                        return True
            self._arguments(buf, out)
            self.buf = ""
            return False
        # tail: the call object's closing brace and the block's end tag
        end = buf.find(CLOSE)
        if end < 0:
            return False
        self.done_calls += 1
        self.buf, self.state = buf[end + len(CLOSE):], "text"
        return True
