"""OpenAI-compatible server for the deployed model: `POST /v1/chat/completions`, `GET /v1/models`,
`GET /health`.

The application keeps its OpenAI client and changes only `base_url`. Concurrent requests
are batched: an asyncio queue gathers up to `max_batch` requests, groups them by sampling
parameters, and runs one batched `generate` per group in a single worker thread (the model is
not shared between threads). Requests that arrive while a batch runs form the next batch; the
extra `batch_wait_ms` gathering wait applies only under concurrent load, so a lone client
pays no batching delay. Streaming answers use OpenAI's chunk format
and end with `data: [DONE]`; the text is produced by a batched generate, so it arrives as one
content chunk after the role chunk.

With a fallback client, a request whose local generation raises or exceeds
`latency_budget_s` is answered by the service LLM instead (through `service.ServiceClient`),
marked with `"llamaduo_fallback": true` in the body and `x-llamaduo-served-by: service`.

GPU route: the merged directory written by `llamaduo deploy` is a plain Hugging Face model
with its chat template, so vLLM's own OpenAI-compatible server serves it as is:
`vllm serve runs/<name>/deploy/merged`.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaduo.config import Config, InferConfig, ModelConfig, ServeConfig
from llamaduo.data import Message
from llamaduo.errors import UserError

if TYPE_CHECKING:
    from llamaduo.service import Client

log = logging.getLogger("llamaduo.serve")

# generator(prompts, sampling, seed) -> one output per prompt × sample, in that order; each output
# has `.text` and optionally `.finish_reason`, `.new_tokens`, `.prompt_tokens`.
Generator = Callable[[list[tuple[str, list[Message]]], InferConfig, int], Sequence[Any]]
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
    seed: int
    n: int
    stream: bool
    include_usage: bool

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
        seed=0 if seed is None else seed,
        n=n,
        stream=bool(body.get("stream")),
        include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")),
    )


# ------------------------------------------------------------------------ batching
@dataclass
class _Job:
    request: ChatRequest
    future: asyncio.Future
    arrived: float
    abandoned: bool = False


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    largest: int = 0


class Batcher:
    """Gathers concurrent requests and runs one `generator` call per group of equal sampling params."""

    def __init__(self, generator: Generator, max_batch: int, wait_s: float):
        self.generator = generator
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.stats = BatchStats()
        # One thread: generation is serialised on the model, the event loop stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamaduo-generate")
        self._task: asyncio.Task | None = None
        self._last_size = 1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, request: ChatRequest) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(request, loop.create_future(), loop.time())
        self.queue.put_nowait(job)
        return job

    async def _gather(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        while len(batch) < self.max_batch and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        # Wait for company only under concurrent load (the last batch had more than one request):
        # a lone client is never delayed. The wait counts from the first request's arrival.
        if self._last_size > 1:
            deadline = batch[0].arrived + self.wait_s
            while len(batch) < self.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except (asyncio.TimeoutError, TimeoutError):
                    break
        self._last_size = len(batch)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [j for j in await self._gather() if not j.abandoned and not j.future.done()]
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                groups.setdefault(job.request.group_key, []).append(job)
            for jobs in groups.values():
                jobs = [j for j in jobs if not j.abandoned and not j.future.done()]
                if not jobs:
                    continue
                req = jobs[0].request
                prompts = [(f"req-{i}", j.request.messages) for i, j in enumerate(jobs)]
                sampling = req.sampling.model_copy(update={"batch_size": len(jobs)})
                self.stats.batches += 1
                self.stats.requests += len(jobs)
                self.stats.largest = max(self.stats.largest, len(jobs))
                try:
                    outs = await loop.run_in_executor(self._executor, self.generator, prompts, sampling, req.seed)
                    outs = list(outs)
                    if len(outs) != len(jobs) * req.n:
                        raise RuntimeError(f"generator returned {len(outs)} outputs for {len(jobs)}×{req.n}")
                except Exception as e:  # each waiting request decides: fallback or error
                    for j in jobs:
                        if not j.future.done() and not j.abandoned:
                            j.future.set_exception(e)
                    continue
                for i, j in enumerate(jobs):
                    if not j.future.done() and not j.abandoned:
                        j.future.set_result(outs[i * req.n : (i + 1) * req.n])


# ------------------------------------------------------------------------ responses
@dataclass
class Choice:
    text: str
    finish_reason: str = "stop"
    completion_tokens: int = 0
    prompt_tokens: int = 0


def _choice(out: Any) -> Choice:
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


def completion_body(rid: str, created: int, model: str, choices: list[Choice], fallback: bool) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)
        ],
        "usage": _usage(choices),
        "llamaduo_fallback": fallback,
    }


def stream_events(rid: str, created: int, model: str, choices: list[Choice], fallback: bool, include_usage: bool):
    """SSE lines in OpenAI's chat.completion.chunk format, ending with `data: [DONE]`."""

    def chunk(choice_list: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choice_list, "llamaduo_fallback": fallback, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    for i, c in enumerate(choices):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        if c.text:
            yield chunk([{"index": i, "delta": {"content": c.text}, "finish_reason": None}])
        yield chunk([{"index": i, "delta": {}, "finish_reason": c.finish_reason}])
    if include_usage:
        yield chunk([], usage=_usage(choices))
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- app
def _bearer_key(cfg: ServeConfig) -> str | None:
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise UserError(f"serve.api_key_env names {cfg.api_key_env}, but that environment variable is not set")
    return key


def create_app(
    generator: Generator,
    cfg: ServeConfig,
    model_name: str,
    fallback_client: "Client | None" = None,
    clock: Callable[[], float] = time.time,
    *,
    defaults: InferConfig | None = None,
    fallback_model: str | None = None,
):
    """The FastAPI app. `defaults` fills sampling fields a request leaves out (the run's infer config).

    `fallback_client` is a `service.ServiceClient` (anything with an async `chat_text`); it is
    used only when `cfg.fallback` is true.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    defaults = defaults or InferConfig()
    key = _bearer_key(cfg)
    fallback = fallback_client if cfg.fallback else None
    if fallback is not None:
        fallback_model = fallback_model or getattr(getattr(fallback, "cfg", None), "model", None) or "service"
    batcher = Batcher(generator, cfg.max_batch, cfg.batch_wait_ms / 1000.0)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="llamaduo", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.fallbacks = 0

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(APIError(exc.status_code, str(exc.detail), None, None))

    def check_auth(request: Request) -> None:
        if key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", None, "invalid_api_key")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise APIError(413, f"request body over {cfg.max_body_bytes} bytes", None, "request_too_large")
        buf = bytearray()
        async for part in request.stream():
            buf += part
            if len(buf) > cfg.max_body_bytes:
                raise APIError(413, f"request body over {cfg.max_body_bytes} bytes", None, "request_too_large")
        return bytes(buf)

    async def from_service(req: ChatRequest, reason: str) -> list[Choice]:
        log.warning("serving from the service LLM (%s): %s", fallback_model, reason)
        app.state.fallbacks += 1
        msgs = [m.model_dump() for m in req.messages]
        try:
            replies = await asyncio.gather(
                *[
                    fallback.chat_text(
                        msgs, model=fallback_model, temperature=req.sampling.temperature,
                        max_tokens=req.sampling.max_new_tokens, sample_index=i, stage="serve_fallback",
                    )
                    for i in range(req.n)
                ]
            )
            errors = [r.error for r in replies if not r.ok]
        except Exception as e:  # budget spent, missing key, ...
            errors = [f"{type(e).__name__}: {e}"]
        if errors:
            raise APIError(502, f"local model failed ({reason}) and the service LLM failed: {errors[0]}",
                           None, "fallback_failed", "server_error")
        return [
            Choice(text=r.raw or "", completion_tokens=r.output_tokens, prompt_tokens=r.input_tokens) for r in replies
        ]

    async def answer(req: ChatRequest) -> tuple[list[Choice], bool]:
        job = batcher.submit(req)
        budget = cfg.latency_budget_s if fallback is not None else None
        try:
            if budget is None:
                outs = await job.future
            else:
                outs = await asyncio.wait_for(asyncio.shield(job.future), budget)
            return [_choice(o) for o in outs], False
        except (asyncio.TimeoutError, TimeoutError):
            job.abandoned = True  # a batch not yet started skips it; a running one's answer is dropped
            return await from_service(req, f"local generation over the {budget:g}s latency budget"), True
        except asyncio.CancelledError:
            job.abandoned = True
            raise
        except Exception as e:
            if fallback is None:
                log.exception("local generation failed")
                raise APIError(500, f"local generation failed: {type(e).__name__}: {e}", None, "generation_failed",
                               "server_error") from None
            return await from_service(req, f"local generation failed: {type(e).__name__}: {e}"), True

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_auth(request)
            req = parse_chat_request(await read_body(request), cfg, defaults)
            choices, used_fallback = await answer(req)
        except APIError as e:
            return error(e)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(clock())
        name = fallback_model if used_fallback else model_name
        headers = {"x-llamaduo-served-by": "service" if used_fallback else "local"}
        if req.stream:
            events = stream_events(rid, created, name, choices, used_fallback, req.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        return JSONResponse(completion_body(rid, created, name, choices, used_fallback), headers=headers)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_auth(request)
        except APIError as e:
            return error(e)
        card = {"id": model_name, "object": "model", "created": int(clock()), "owned_by": "llamaduo"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model_name,
            "queued": batcher.queue.qsize(),
            "batches": batcher.stats.batches,
            "fallback": fallback is not None,
            "fallbacks": app.state.fallbacks,
        }

    return app


# ------------------------------------------------------------------ local model
def local_generator(model: Any, tokenizer: Any) -> Generator:
    """`generate` over a loaded model, as the server's generator (adds prompt token counts)."""
    from llamaduo import infer, models

    def run(prompts: list[tuple[str, list[Message]]], sampling: InferConfig, seed: int) -> list[Choice]:
        outs = infer.generate(model, tokenizer, prompts, sampling, seed=seed)
        lengths = [len(models.encode_prompt(tokenizer, m)) for _, m in prompts]
        k = sampling.num_samples
        return [
            Choice(
                text=o.text,
                finish_reason=o.finish_reason or "stop",
                completion_tokens=int(o.new_tokens or 0),
                prompt_tokens=lengths[i // k],
            )
            for i, o in enumerate(outs)
        ]

    return run


def resolve_model_dir(model_or_run_dir: Path) -> tuple[Path, str]:
    """(model directory, served model name) for a run directory or a merged model directory."""
    from llamaduo.store import RunStore

    path = Path(model_or_run_dir)
    store = RunStore(path)
    if store.exists():
        merged = store.merged_dir
        if not (merged / "config.json").exists():
            raise UserError(f"{path}: no deployed model in {merged}; run `llamaduo deploy` first")
        return merged, path.resolve().name
    if not (path / "config.json").exists():
        raise UserError(f"{path}: neither a run directory nor a model directory (no config.json)")
    resolved = path.resolve()
    # runs/<name>/deploy/merged is served under the run's name.
    if resolved.name == "merged" and resolved.parent.name == "deploy":
        return path, resolved.parent.parent.name
    return path, resolved.name


def build_app(model_or_run_dir: Path, cfg: Config):
    """Load the deployed model and build its app (with the fallback client when configured)."""
    from llamaduo import models

    model_dir, name = resolve_model_dir(model_or_run_dir)
    from llamaduo.infer import for_generation

    model, tokenizer = models.load_model(ModelConfig(base=str(model_dir), dtype=cfg.model.dtype))
    model = for_generation(model, cfg.infer)  # served in the precision the rounds were judged in
    fallback = None
    if cfg.serve.fallback:
        from llamaduo.service import ServiceClient
        from llamaduo.store import RunStore

        store = RunStore(model_or_run_dir)
        fallback = ServiceClient(cfg.service, db_path=store.service_db if store.exists() else None)
    app = create_app(local_generator(model, tokenizer), cfg.serve, name, fallback, defaults=cfg.infer,
                     fallback_model=cfg.service.model)
    return app, name


class BackgroundServer:
    """uvicorn in a daemon thread; `start()` returns once the socket is bound."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, model_name: str = "", sock: Any = None):
        import uvicorn

        self.model_name = model_name
        self.host = host
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        # A socket bound by the caller (see `bind_port`) leaves no gap for another process to take the port.
        sockets = [sock] if sock is not None else None
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets}, name="llamaduo-serve", daemon=True)

    def start(self, timeout_s: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"server on {self.host} did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def wait(self) -> None:
        """Block until the server stops. Joining in short slices keeps Ctrl-C (SIGINT, delivered to the
        main thread) arriving here as KeyboardInterrupt; uvicorn installs no handlers off the main thread."""
        while self.thread.is_alive():
            self.thread.join(timeout=0.25)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bind_port(host: str, preferred: int, span: int = 50) -> tuple[Any, int]:
    """Bind the first free port from `preferred` on (a stable address for copy-paste snippets).

    Returns the bound socket (hand it to `BackgroundServer`) and its port."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in range(preferred, preferred + span):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            continue
        return sock, port
    raise UserError(f"no free port on {host} in {preferred}-{preferred + span - 1}; pass --port")


def start_background(
    model_or_run_dir: Path, cfg: Config, host: str | None = None, port: int = 0, sock: Any = None
) -> "BackgroundServer":
    """Serve a deployed model from a background thread (for the demo and tests)."""
    app, name = build_app(model_or_run_dir, cfg)
    return BackgroundServer(app, host or cfg.serve.host, port, model_name=name, sock=sock).start()


def serve(model_or_run_dir: Path, cfg: Config, host: str | None = None, port: int | None = None) -> None:
    """Serve a deployed model (or a run directory's deployed model) until interrupted."""
    import uvicorn

    host = host or cfg.serve.host
    port = cfg.serve.port if port is None else port
    if host not in ("127.0.0.1", "localhost", "::1") and cfg.serve.api_key_env is None:
        log.warning("serving on %s without an API key (set serve.api_key_env)", host)
    app, name = build_app(model_or_run_dir, cfg)
    log.info("serving %s on http://%s:%s/v1", name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
