"""The OpenAI chat-completions wire format of `llamaduo serve`.

Validating a request body into a `ChatRequest` (every bad field is a 400 naming it; the
structured-output fields are read by `chat_formats.py`), the error body, the response body and
the SSE chunks of a streamed answer, tool calls included. A conversation with tool turns keeps
its OpenAI shape in `ChatRequest.conversation` and is flattened into plain turns in `messages`
(the text format of `tools.py`). No I/O: the app in `serve.py` reads the request and sends what
these functions build.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llamaduo.chat_formats import (
    FieldError,
    grammar_spec,
    parse_logprobs,
    parse_response_format,
    parse_tool_choice,
    parse_tools,
)
from llamaduo.config import InferConfig, ServeConfig
from llamaduo.constraint import ConstraintFactory
from llamaduo.data import Message
from llamaduo.grammar import GrammarSpec
from llamaduo.tools import parse_tool_calls, plain_messages

MAX_N = 16
# Known OpenAI fields this server cannot honour, with the values that ask for nothing.
UNHONOURED: dict[str, tuple] = {
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
}


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
    messages: list[Message]  # the conversation as plain turns (tools in the text format of `tools.py`)
    sampling: InferConfig
    seed: int | None  # None: the engine draws a fresh one, so unseeded samples differ
    n: int
    stream: bool
    include_usage: bool
    model: str | None = None  # the `model` the request named; None: it named none (the served model answers)
    conversation: list[dict[str, Any]] = field(default_factory=list)  # OpenAI-shaped, tool turns included
    tools: list[dict[str, Any]] = field(default_factory=list)  # offered functions, as sent
    tool_choice: str = "none"  # none | auto | required | function (named by `tool_name`)
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    grammar: GrammarSpec | None = None  # what the answer must be (response_format / forced tool call)
    logprobs: int | None = None  # None = off, 0 = the chosen token's, N = also the top N alternatives
    constraint: ConstraintFactory | None = None  # one TokenConstraint per generated sequence, set from `grammar`
    adapter: str | None = None  # the LoRA adapter that answers (a served model name); None = the base
    prompt: str | None = None  # the rendered prompt, when the server's template renders tools itself
    request_fields: dict[str, Any] = field(default_factory=dict)  # tools ... response_format as sent (fallback forwards them)
    _ids: tuple[str | None, list[int]] | None = field(default=None, repr=False)  # (the prompt they encode, token ids)

    def prompt_ids(self, tokenizer: Any) -> list[int]:
        """The prompt's token ids, encoded once: the context check and the prefill share them (re-encoded
        if `prompt` was set since, e.g. by a template that renders the tools itself)."""
        if self._ids is None or self._ids[0] is not self.prompt:
            from llamaduo.infer import prompt_ids

            self._ids = (self.prompt, prompt_ids(tokenizer, self.prompt or self.messages))
        return self._ids[1]

    @property
    def group_key(self) -> tuple:
        s = self.sampling
        return (s.temperature, s.top_p, s.max_new_tokens, tuple(s.stop), s.num_samples, self.seed)

    @property
    def calls_tools(self) -> bool:
        """Whether the answer is read for tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def call_names(self) -> set[str]:
        """The functions an answer's calls may name (only the named one under a forced function)."""
        if not self.calls_tools:
            return set()
        return {t["function"]["name"] for t in self.tools
                if self.tool_choice != "function" or t["function"]["name"] == self.tool_name}

    @property
    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """The tools shown to the model: none with `tool_choice: none` (it must not call)."""
        return self.tools if self.calls_tools else None


def _content_text(content: Any, i: int, optional: bool = False) -> str:
    if content is None and optional:
        return ""
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


def _tool_call(c: Any, i: int, j: int) -> dict[str, Any]:
    where = f"messages[{i}].tool_calls[{j}]"
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or c.get("type", "function") != "function":
        raise APIError(400, f"{where} must be a function call with a name", where)
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        raise APIError(400, f"{where}.function.arguments must be a JSON string", f"{where}.function.arguments")
    return {"id": str(c.get("id") or f"call_{j}"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def _conversation(msgs: Any) -> list[dict[str, Any]]:
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' is required: a non-empty list", "messages", "missing_required_parameter")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}].role {m.get('role')!r} is not supported", f"messages[{i}].role")
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls is not None and not isinstance(calls, list):
            raise APIError(400, f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls")
        turn: dict[str, Any] = {"role": role, "content": _content_text(m.get("content"), i, optional=bool(calls))}
        if calls:
            turn["tool_calls"] = [_tool_call(c, i, j) for j, c in enumerate(calls)]
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise APIError(400, f"messages[{i}].tool_call_id is required for a tool message", f"messages[{i}].tool_call_id")
            turn["tool_call_id"] = m["tool_call_id"]
        out.append(turn)
    return out


def _unsupported(body: dict[str, Any]) -> None:
    """A field set to something this server cannot do is a 400 naming it, never ignored."""
    for name, harmless in UNHONOURED.items():
        if name in body and body[name] not in harmless:
            raise APIError(400, f"{name} is not supported by this server", name, "unsupported_parameter")


def parse_chat_request(raw: bytes, cfg: ServeConfig, defaults: InferConfig) -> ChatRequest:
    """Validate an OpenAI chat-completions body; raises APIError(400) naming the bad field.

    Fields this server does not know are tolerated, as OpenAI does; known ones it cannot honour
    are refused (`UNHONOURED`)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", None, "invalid_json")
    conversation = _conversation(body.get("messages"))
    _unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", "model", "invalid_value")
    tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(tokens_field)
    if max_tokens is None:
        max_tokens = min(defaults.max_new_tokens, cfg.max_tokens_limit)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, f"{tokens_field} must be a positive integer", tokens_field, "invalid_value")
    if max_tokens > cfg.max_tokens_limit:
        raise APIError(
            400, f"{tokens_field} {max_tokens} is over this server's limit of {cfg.max_tokens_limit}", tokens_field,
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
    try:
        tools = parse_tools(body.get("tools"))
        choice, name = parse_tool_choice(body.get("tool_choice"), tools)
        parallel = body.get("parallel_tool_calls")
        if parallel is not None and not isinstance(parallel, bool):
            raise FieldError("parallel_tool_calls", "must be a boolean")
        logprobs, top = parse_logprobs(body)
        response_format = parse_response_format(body.get("response_format"))
    except FieldError as e:
        raise APIError(400, f"{e.param} {e.reason}", e.param, "invalid_value") from None
    opts = body.get("stream_options")
    req = ChatRequest(
        messages=[],
        sampling=sampling,
        seed=seed,
        n=n,
        stream=bool(body.get("stream")),
        include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")),
        model=model,
        conversation=conversation,
        tools=tools,
        tool_choice=choice,
        tool_name=name,
        parallel_tool_calls=True if parallel is None else parallel,
        logprobs=top if logprobs else None,
    )
    req.request_fields = {k: body[k] for k in ("tools", "tool_choice", "parallel_tool_calls", "response_format")
                          if body.get(k) is not None}
    req.messages = plain_messages(conversation, req.prompt_tools)
    req.grammar = grammar_spec(response_format, tools, choice, name, req.parallel_tool_calls)
    return req


# ------------------------------------------------------------------------ responses
@dataclass
class Choice:
    text: str | None
    finish_reason: str = "stop"
    completion_tokens: int = 0
    prompt_tokens: int = 0
    logprobs: list[dict] | None = None  # OpenAI's choices[].logprobs.content items, when asked for
    tokens: list[int] = field(default_factory=list)  # the generated token ids (engine answers)
    tool_calls: list[dict[str, Any]] | None = None


def as_choice(out: Any) -> Choice:
    """A generator output (`.text`, optional `.finish_reason`, token counts, `.logprobs`) as a response choice."""
    reason = getattr(out, "finish_reason", None)
    return Choice(
        text=str(getattr(out, "text", out)),
        finish_reason="length" if reason == "length" else "stop",
        completion_tokens=int(getattr(out, "new_tokens", 0) or getattr(out, "completion_tokens", 0) or 0),
        prompt_tokens=int(getattr(out, "prompt_tokens", 0) or 0),
        logprobs=getattr(out, "logprobs", None),
    )


def read_tool_calls(choice: Choice, req: ChatRequest) -> Choice:
    """The choice with the model's calls to offered functions moved into `tool_calls`.

    A call that was cut off by `max_tokens` does not parse: the text stays, `finish_reason` `length`."""
    if not req.calls_tools or choice.text is None:
        return choice
    content, calls = parse_tool_calls(choice.text, req.call_names)
    if not calls:
        return choice
    if not req.parallel_tool_calls:
        calls = calls[:1]
    cut = choice.finish_reason == "length" and content is not None and "<tool_call>" in content
    choice.text, choice.tool_calls = content, calls
    choice.finish_reason = "length" if cut else "tool_calls"  # a later call cut off: the answer is not whole
    return choice


def _usage(choices: list[Choice]) -> dict[str, int]:
    prompt = choices[0].prompt_tokens if choices else 0
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs(c: Choice) -> dict[str, Any] | None:
    return None if c.logprobs is None else {"content": c.logprobs, "refusal": None}


def _message(c: Choice) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": c.text}
    if c.tool_calls:
        msg["tool_calls"] = c.tool_calls
    return msg


def completion_body(rid: str, created: int, model: str, choices: list[Choice], fallback: bool) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "message": _message(c), "logprobs": _logprobs(c), "finish_reason": c.finish_reason}
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


def tool_call_deltas(calls: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Streamed tool calls as OpenAI sends them: per call, its id and name, then its arguments."""
    for k, call in enumerate(calls):
        fn = call["function"]
        yield {"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                               "function": {"name": fn["name"], "arguments": ""}}]}
        yield {"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]}


def stream_events(
    rid: str, created: int, model: str, choices: list[Choice], fallback: bool, include_usage: bool
) -> Iterator[str]:
    """SSE lines of a whole answer in OpenAI's chat.completion.chunk format, ending with `data: [DONE]`."""
    for i, c in enumerate(choices):
        yield sse_chunk(rid, created, model, fallback, [delta(i, role=True)])
        if c.text or c.logprobs:
            yield sse_chunk(rid, created, model, fallback, [delta(i, c.text, logprobs=c.logprobs)])
        for d in tool_call_deltas(c.tool_calls or []):
            yield sse_chunk(rid, created, model, fallback, [{"index": i, "delta": d, "finish_reason": None}])
        yield sse_chunk(rid, created, model, fallback, [delta(i, finish_reason=c.finish_reason)])
    if include_usage:
        yield usage_chunk(rid, created, model, choices, fallback)
    yield "data: [DONE]\n\n"
