"""The steps of one chat request around the engine: the model it names, watching for its client to
leave, fitting its grammar and prompt (structured output, tools), and sending its tokens as SSE."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from starlette.responses import Response

from llamaduo.chat_api import APIError, ChatRequest, delta, sse_chunk, usage_chunk
from llamaduo.grammar import Grammars
from llamaduo.rowbatch import Event
from llamaduo.scheduler import Stream, StreamClosed
from llamaduo.tool_stream import ToolCallStream
from llamaduo.tools import render_conversation, renders_tools

log = logging.getLogger("llamaduo.serve")


def requested_model(raw: bytes) -> str | None:
    with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
        name = json.loads(raw).get("model")
        return name if isinstance(name, str) else None
    return None


async def watch_disconnect(receive: Callable[[], Any], stream: Stream) -> None:
    """Cancel `stream` (its rows leave the batch) once the client has gone away."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            stream.cancel()
            return


def check_context(req: ChatRequest, tokenizer: Any, context_length: int | None) -> None:
    """A prompt plus `max_tokens` beyond the model's context is a 400, as OpenAI answers, before it
    costs the batch anything (one oversized request must not hold the others up)."""
    if tokenizer is None or not context_length:
        return
    # A token spells at most `longest` characters, so this many characters need at least chars/longest
    # tokens: a prompt that cannot fit is refused without tokenizing it (900 KB takes seconds).
    chars = len(req.prompt) if req.prompt else sum(len(m.content) for m in req.messages)
    if chars // _longest_token(tokenizer) + req.sampling.max_new_tokens > context_length:
        raise APIError(
            400, f"This model's maximum context length is {context_length} tokens. However, you requested at least "
            f"{chars // _longest_token(tokenizer) + req.sampling.max_new_tokens} tokens ({chars} characters in the "
            f"messages, {req.sampling.max_new_tokens} in the completion).", "messages", "context_length_exceeded",
        )
    prompt = len(req.prompt_ids(tokenizer))  # kept on the request: its prefill does not encode it again
    asked = prompt + req.sampling.max_new_tokens
    if asked > context_length:
        raise APIError(
            400, f"This model's maximum context length is {context_length} tokens. However, you requested {asked} "
            f"tokens ({prompt} in the messages, {req.sampling.max_new_tokens} in the completion).", "messages",
            "context_length_exceeded",
        )


# Prompts up to this many characters are encoded on the event loop (well under a millisecond); a
# longer one in a worker thread, so it does not hold up the other requests' streams.
INLINE_CHARS = 8192


async def fit_context(req: ChatRequest, tokenizer: Any, context_length: int | None) -> None:
    """`check_context`, off the event loop for a long prompt: a thread hand-off costs a short one more
    than its encoding."""
    chars = len(req.prompt) if req.prompt else sum(len(m.content) for m in req.messages)
    if chars <= INLINE_CHARS:
        check_context(req, tokenizer, context_length)
    else:
        await asyncio.to_thread(check_context, req, tokenizer, context_length)


_LONGEST: dict[int, int] = {}


def _longest_token(tokenizer: Any) -> int:
    """The most characters one token of the vocabulary can stand for (its spelling's length bounds it)."""
    key = id(tokenizer)
    if key not in _LONGEST:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        _LONGEST[key] = max((len(t) for t in vocab), default=0) or 64
    return _LONGEST[key]


async def structure(req: ChatRequest, tokenizer: Any, grammars: Grammars | None) -> None:
    """Set the request's grammar constraint and, for templates that render tools, its prompt text."""
    if req.grammar is not None:
        param = "tool_choice" if req.grammar.tools_required else "response_format"
        if grammars is None:
            raise APIError(400, f"{param} needs constrained decoding, which this server's generator does not run",
                           param, "unsupported_parameter")
        try:  # compiling a new schema takes a moment on a large vocabulary: off the event loop
            req.constraint = await asyncio.to_thread(grammars.factory, req.grammar, req.sampling.max_new_tokens)
        except Exception as e:
            raise APIError(400, f"{param} cannot be enforced: {e}", param, "invalid_value") from None
    tool_turns = any(m["role"] == "tool" or m.get("tool_calls") for m in req.conversation)
    if tokenizer is not None and (req.prompt_tools or tool_turns) and renders_tools(tokenizer):
        req.prompt = render_conversation(tokenizer, req.conversation, req.prompt_tools)


# ------------------------------------------------------------------ local model

def merged(events: list[Event]) -> list[Event]:
    """Consecutive events of one choice as one (several steps handed over at once go out as one chunk)."""
    out: list[Event] = []
    for e in events:
        last = out[-1] if out else None
        if last is not None and last.index == e.index and last.finish_reason is None:
            logprobs = (last.logprobs or []) + (e.logprobs or []) if (last.logprobs or e.logprobs) else None
            out[-1] = replace(last, text=last.text + e.text, logprobs=logprobs, finish_reason=e.finish_reason,
                              completion_tokens=e.completion_tokens, tokens=last.tokens + e.tokens)
        else:
            out.append(e)
    return out


def tokens_as_sse(rid: str, created: int, name: str, stream: Stream, first: Any,
                  done: Callable[[list[Any]], None] | None, headers: dict[str, str]) -> EventStream:
    """The response of a streamed local answer (`sse_parts` through `EventStream`)."""
    return EventStream(sse_parts(rid, created, name, stream, first, done), headers)


async def sse_parts(rid: str, created: int, name: str, stream: Stream, first: Any,
                    done: Callable[[list[Any]], None] | None = None) -> AsyncIterator[tuple[str, bool]]:
    """The chunks of a streamed local answer, each sent as soon as its tokens are decoded, as (text,
    whether it is the last); `done` gets the finished choices (metrics, the shadow sampler) once the
    last token has gone out. Ends quietly when the stream is cancelled (its client went away)."""
    req = stream.request
    # An answer that may call tools: its text goes through one streamer per choice (content and
    # tool-call deltas as OpenAI sends them, see `tool_stream.py`).
    calls = [ToolCallStream(req.call_names, req.parallel_tool_calls) for _ in range(req.n)] if req.calls_tools else None
    # The chunks of one hand-over go out in one write: each send crosses the ASGI stack and a socket write,
    # event loop time the generation thread waits for (it needs the interpreter lock back).
    out = [sse_chunk(rid, created, name, False, [delta(i, role=True)]) for i in range(req.n)]
    try:
        events = first
        while events is not None:
            for e in merged(events):
                out += _event_chunks(rid, created, name, e, calls)
            if stream.open == 0:  # every choice has finished: the rest goes out with the last tokens
                break
            yield "".join(out), False
            out = []
            left = None if stream.deadline is None else stream.deadline - time.monotonic()
            try:
                events = await asyncio.wait_for(stream.next(), left)
            except (asyncio.TimeoutError, TimeoutError):  # past the deadline: the rows leave the batch (finally)
                body = APIError(504, "the request ran past its deadline (serve.request_timeout_s)", None, "timeout",
                                "server_error").body()
                yield f"data: {json.dumps(body)}\n\n", True
                return
        if done is not None:
            done(stream.choices)
        if req.include_usage:
            out.append(usage_chunk(rid, created, name, stream.choices, False))
        yield "".join([*out, "data: [DONE]\n\n"]), True
    except StreamClosed:
        return
    except Exception as e:  # too late for a status code: the stream ends with an error event
        log.exception("local generation failed while streaming")
        body = APIError(500, f"local generation failed: {type(e).__name__}: {e}", None, "generation_failed",
                        "server_error").body()
        yield "".join([*out, f"data: {json.dumps(body)}\n\n"]), True
    finally:
        stream.cancel()
        if stream.watcher is not None:
            stream.watcher.cancel()


class EventStream(Response):
    """A streamed local answer as a plain ASGI response (`sse_parts`' chunks).

    Leaner than a `StreamingResponse`, on the path every token takes: the last chunk closes the body
    in the same socket write (not one more, empty, write per answer), and no task group listens for
    the client leaving, since the request's own watcher (`watch_disconnect`) cancels its stream."""

    media_type = "text/event-stream"

    def __init__(self, parts: AsyncIterator[tuple[str, bool]], headers: dict[str, str]):
        self.parts, self.status_code, self.background = parts, 200, None
        self.init_headers(headers)

    async def __call__(self, scope: dict, receive: Callable[[], Any], send: Callable[[dict], Any]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for text, last in self.parts:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": not last})
            if last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _event_chunks(rid: str, created: int, name: str, e: Event, calls: list[ToolCallStream] | None) -> list[str]:
    """The SSE chunks of one choice's event: its content (or tool-call deltas) and its finish."""
    out = []
    if calls is None:
        if e.text or e.logprobs:
            out.append(sse_chunk(rid, created, name, False, [delta(e.index, e.text, logprobs=e.logprobs)]))
        reason = e.finish_reason
    else:
        parts = calls[e.index].feed(e.text)
        if e.finish_reason is not None:
            more, reason = calls[e.index].finish(e.finish_reason)
            parts += more
        else:
            reason = None
        if e.logprobs and not parts:
            parts = [{}]
        for k, d in enumerate(parts):
            lp = {"logprobs": {"content": e.logprobs, "refusal": None}} if e.logprobs and k == 0 else {}
            out.append(sse_chunk(rid, created, name, False, [{"index": e.index, "delta": d, "finish_reason": None, **lp}]))
    if reason is not None:
        out.append(sse_chunk(rid, created, name, False, [delta(e.index, finish_reason=reason)]))
    return out
