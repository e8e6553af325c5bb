"""The OpenAI chat-completions wire format of `llamaduo serve`.

Validating a request body into a `ChatRequest` (every bad field is a 400 naming it), the
error body, the response body and the SSE chunks of a streamed answer. No I/O: the app in
`serve.py` reads the request and sends what these functions build.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llamaduo.config import InferConfig, ServeConfig
from llamaduo.constraint import ConstraintFactory
from llamaduo.data import Message

MAX_N = 16


# ------------------------------------------------------------------------ errors
class APIError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------- requests
@dataclass
class ChatRequest:
    messages: list[Message]
    sampling: InferConfig
    seed: int | None  # None: the engine draws a fresh one, so unseeded samples differ
    n: int
    stream: bool
    include_usage: bool
    constraint: ConstraintFactory | None = None  # one TokenConstraint per generated sequence
    logprobs: int | None = None  # None = off, 0 = the chosen token's, N = also the top N alternatives
    adapter: str | None = None  # the LoRA adapter that answers (a served model name); None = the base
    model: str | None = None  # the `model` the request named

    @property
    def group_key(self) -> tuple:
        s = self.sampling
        return (s.temperature, s.top_p, s.max_new_tokens, tuple(s.stop), s.num_samples, self.seed)


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise APIError(400, f"{name} must be a number between {lo:g} and {hi:g}", name, "invalid_value")
    return float(v)


def parse_chat_request(raw: bytes, cfg: ServeConfig, defaults: InferConfig) -> ChatRequest:
    """Validate an OpenAI chat-completions body; raises APIError(400) naming the bad field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", None, "invalid_json")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' is required: a non-empty list", "messages", "missing_required_parameter")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role {m.get('role')!r} is not supported", f"messages[{i}].role")
        messages.append(Message(role=role, content=_content_text(m.get("content"), i)))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(defaults.max_new_tokens, cfg.max_tokens_limit)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, "max_tokens must be a positive integer", "max_tokens", "invalid_value")
    if max_tokens > cfg.max_tokens_limit:
        raise APIError(
            400, f"max_tokens {max_tokens} is over this server's limit of {cfg.max_tokens_limit}", "max_tokens",
            "invalid_value",
        )
    n = body.get("n")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise APIError(400, f"n must be an integer between 1 and {MAX_N}", "n", "invalid_value")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a string or a list of strings", "stop", "invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "seed must be an integer", "seed", "invalid_value")
    sampling = defaults.model_copy(
        update={
            "temperature": _number(body, "temperature", defaults.temperature, 0.0, 2.0),
            "top_p": _number(body, "top_p", defaults.top_p, 1e-9, 1.0),
            "max_new_tokens": max_tokens,
            "num_samples": n,
            "stop": list(stop) or list(defaults.stop),
        }
    )
    opts = body.get("stream_options")
    return ChatRequest(
        messages=messages,
        sampling=sampling,
        seed=seed,
        n=n,
        model=body.get("model") if isinstance(body.get("model"), str) else None,
        stream=bool(body.get("stream")),
        include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")),
    )


# ------------------------------------------------------------------------ responses
@dataclass
class Choice:
    text: str
    finish_reason: str = "stop"
    completion_tokens: int = 0
    prompt_tokens: int = 0
    logprobs: list[dict] | None = None  # OpenAI's choices[].logprobs.content items, when asked for
    tokens: list[int] = field(default_factory=list)  # the generated token ids (engine answers)


def as_choice(out: Any) -> Choice:
    """A generator output (`.text`, optional `.finish_reason`, token counts) as a response choice."""
    reason = getattr(out, "finish_reason", None)
    return Choice(
        text=str(getattr(out, "text", out)),
        finish_reason="length" if reason == "length" else "stop",
        completion_tokens=int(getattr(out, "new_tokens", 0) or getattr(out, "completion_tokens", 0) or 0),
        prompt_tokens=int(getattr(out, "prompt_tokens", 0) or 0),
    )


def _usage(choices: list[Choice]) -> dict[str, int]:
    prompt = choices[0].prompt_tokens if choices else 0
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs(c: Choice) -> dict[str, Any] | None:
    return None if c.logprobs is None else {"content": c.logprobs, "refusal": None}


def completion_body(rid: str, created: int, model: str, choices: list[Choice], fallback: bool) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": _logprobs(c),
             "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)
        ],
        "usage": _usage(choices),
        "llamaduo_fallback": fallback,
    }


def sse_chunk(rid: str, created: int, model: str, fallback: bool, choice_list: list[dict[str, Any]],
              **extra: Any) -> str:
    """One SSE line of a chat.completion.chunk."""
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choice_list, "llamaduo_fallback": fallback, **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def delta(index: int, content: str | None = None, *, role: bool = False, finish_reason: str | None = None,
          logprobs: list[dict] | None = None) -> dict[str, Any]:
    """A chunk's choice: the role opening a choice, new content (with its tokens' logprobs) or its finish."""
    d: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
    if content is not None:
        d["content"] = content
    out: dict[str, Any] = {"index": index, "delta": d, "finish_reason": finish_reason}
    if logprobs is not None:
        out["logprobs"] = {"content": logprobs, "refusal": None}
    return out


def usage_chunk(rid: str, created: int, model: str, choices: list[Choice], fallback: bool) -> str:
    return sse_chunk(rid, created, model, fallback, [], usage=_usage(choices))


def stream_events(
    rid: str, created: int, model: str, choices: list[Choice], fallback: bool, include_usage: bool
) -> Iterator[str]:
    """SSE lines of a whole answer in OpenAI's chat.completion.chunk format, ending with `data: [DONE]`."""
    for i, c in enumerate(choices):
        yield sse_chunk(rid, created, model, fallback, [delta(i, role=True)])
        if c.text or c.logprobs:
            yield sse_chunk(rid, created, model, fallback, [delta(i, c.text, logprobs=c.logprobs)])
        yield sse_chunk(rid, created, model, fallback, [delta(i, finish_reason=c.finish_reason)])
    if include_usage:
        yield usage_chunk(rid, created, model, choices, fallback)
    yield "data: [DONE]\n\n"
