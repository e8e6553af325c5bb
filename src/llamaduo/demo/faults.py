"""What the simulator can be told to do, and the bodies it answers with: injected faults, error
replies, latency distributions, the OpenAI chat-completion shape and the token weight a request
counts against a tokens-per-minute limit."""

from __future__ import annotations

import email.parser
import email.policy
import json
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any


@dataclass
class ErrorReply:
    """What a responder returns to answer with an HTTP error (e.g. a server refusing a request field)."""

    status: int
    message: str


@dataclass
class Fault:
    """One injected misbehaviour, consumed by the next request."""

    kind: str
    status: int = 200
    seconds: float = 0.0
    text: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def rate_limit(retry_after_s: float = 1.0) -> Fault:
        return Fault("rate_limit", 429, headers={"Retry-After": f"{retry_after_s:g}"})

    @staticmethod
    def server_error(status: int = 500) -> Fault:
        return Fault("server_error", status)

    @staticmethod
    def timeout(seconds: float) -> Fault:
        return Fault("timeout", seconds=seconds)

    @staticmethod
    def malformed() -> Fault:
        return Fault("malformed")

    @staticmethod
    def truncated_json() -> Fault:
        return Fault("bad_content", text='{"similarity": {"score": 8')

    @staticmethod
    def bad_content(text: str) -> Fault:
        return Fault("bad_content", text=text)


@dataclass(frozen=True)
class Latency:
    """How long a chat reply takes: `median_s`, spread lognormally by `sigma` (0 = always the median)."""

    median_s: float = 0.0
    sigma: float = 0.0

    @staticmethod
    def fixed(seconds: float) -> Latency:
        return Latency(seconds, 0.0)

    @staticmethod
    def lognormal(median_s: float, p99_over_median: float = 8.0) -> Latency:
        """Lognormal with the given median and p99 = `p99_over_median` × median (the default, 8,
        is the long tail of a busy provider: a 1 s median with a p99 of 8 s)."""
        return Latency(median_s, math.log(p99_over_median) / NormalDist().inv_cdf(0.99))

    @staticmethod
    def parse(spec: str) -> Latency:
        """`lognormal:MEDIAN_S`, `fixed:SECONDS` or plain `SECONDS`."""
        kind, _, value = spec.partition(":")
        if not value:
            return Latency.fixed(float(kind))
        if kind == "lognormal":
            return Latency.lognormal(float(value))
        if kind == "fixed":
            return Latency.fixed(float(value))
        raise ValueError(f"latency {spec!r}: expected lognormal:MEDIAN_S, fixed:SECONDS or SECONDS")

    def sample(self, rng: random.Random) -> float:
        return self.median_s * math.exp(self.sigma * rng.gauss(0.0, 1.0)) if self.sigma else self.median_s


def estimate_tokens(text: str) -> int:
    return len(text) // 4 + 1


def rate_limit_tokens(body: dict[str, Any]) -> int:
    """What a request counts against a tokens-per-minute limit on arrival: its prompt plus its
    max_tokens (OpenAI's rule: the completion is not known yet)."""
    messages = body.get("messages", [])
    prompt = estimate_tokens(json.dumps(messages)) if messages else 0
    return prompt + int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)


def chat_completion(body: dict[str, Any], reply: str) -> dict[str, Any]:
    """The OpenAI chat.completion object answering `body` with `reply`."""
    prompt = json.dumps(body.get("messages", []))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "simulated"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": estimate_tokens(prompt),
            "completion_tokens": estimate_tokens(reply),
            "total_tokens": estimate_tokens(prompt) + estimate_tokens(reply),
        },
    }


def anthropic_message(body: dict[str, Any], reply: str | list[dict[str, Any]]) -> dict[str, Any]:
    """The Anthropic Messages API reply answering `body`: `reply` as one text block, or these
    content blocks (`{"type": "tool_use", "id", "name", "input"}` ends the turn with tool_use)."""
    blocks = [{"type": "text", "text": reply}] if isinstance(reply, str) else reply
    calls = any(b.get("type") == "tool_use" for b in blocks)
    return {
        "id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant",
        "model": body.get("model", "simulated"), "content": blocks,
        "stop_reason": "tool_use" if calls else "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": estimate_tokens(json.dumps(body.get("messages", []))),
                  "output_tokens": estimate_tokens(json.dumps(blocks) if calls else "".join(b.get("text", "") for b in blocks))},
    }


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: name -> (filename, bytes)."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    return {
        part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
        for part in msg.iter_parts()
    }


