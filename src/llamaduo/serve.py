"""OpenAI-compatible server for the deployed model: `POST /v1/chat/completions`, `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health`.

The application keeps its OpenAI client and changes only `base_url`. Concurrent requests
are batched (`batcher.py`). Streaming answers use OpenAI's chunk format (`chat_api.py`)
and end with `data: [DONE]`; the text is produced by a batched generate, so it arrives as one
content chunk after the role chunk. A model name other than the served one is a 404
`model_not_found`. `response_format` and forced tool calls are decoded under a grammar
(`grammar.py`), tools are rendered into the prompt (`tools.py`); see docs/serving.md.

With a fallback client, a request whose local generation raises or exceeds
`latency_budget_s` is answered by the service LLM instead (`fallback.py`),
marked with `"llamaduo_fallback": true` in the body and `x-llamaduo-served-by: service`.

GPU route: the merged directory written by `llamaduo deploy` is a plain Hugging Face model
with its chat template, so vLLM's own OpenAI-compatible server serves it as is:
`vllm serve runs/<name>/deploy/merged` (its switches for tools and LoRA adapters: docs/serving.md).
"""

import asyncio
import contextlib
import hmac
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaduo.batcher import Batcher, Generator, local_generator
from llamaduo.chat_api import (
    APIError,
    ChatRequest,
    Choice,
    as_choice,
    completion_body,
    parse_chat_request,
    read_tool_calls,
    stream_events,
)
from llamaduo.config import Config, InferConfig, ModelConfig, ServeConfig
from llamaduo.errors import UserError
from llamaduo.fallback import from_service as fallback_answer
from llamaduo.grammar import Grammars
from llamaduo.tools import render_conversation, renders_tools

if TYPE_CHECKING:
    from llamaduo.service import Client

log = logging.getLogger("llamaduo.serve")


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
    tokenizer: Any = None,
):
    """The FastAPI app. `defaults` fills sampling fields a request leaves out (the run's infer config).

    `fallback_client` is a `service.ServiceClient` (anything with an async `chat_text`); it is
    used only when `cfg.fallback` is true. `tokenizer` (the generator's) enables structured
    output and tools: without it, a request that needs a grammar is a 400.
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
    grammars = Grammars(tokenizer) if tokenizer is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        # The grammar engine reads the vocabulary once, in the background, before the first JSON request.
        warming = asyncio.create_task(asyncio.to_thread(grammars.warm)) if grammars is not None else None
        try:
            yield
        finally:
            if warming is not None:
                with contextlib.suppress(Exception):
                    await warming
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
        app.state.fallbacks += 1
        return await fallback_answer(fallback, fallback_model, req, reason)

    async def answer(req: ChatRequest) -> tuple[list[Choice], bool]:
        job = batcher.submit(req)
        budget = cfg.latency_budget_s if fallback is not None else None
        try:
            if budget is None:
                outs = await job.future
            else:
                outs = await asyncio.wait_for(asyncio.shield(job.future), budget)
            return [as_choice(o) for o in outs], False
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

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{model_name}`)", "model",
                           "model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_auth(request)
            req = parse_chat_request(await read_body(request), cfg, defaults)
            check_model(req.model)
            if req.logprobs and not getattr(generator, "computes_logprobs", False):
                raise APIError(400, "logprobs are not computed by this server's engine", "logprobs", "unsupported_parameter")
            await structure(req, tokenizer, grammars)
            choices, used_fallback = await answer(req)
            choices = [read_tool_calls(c, req) for c in choices]
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
        return {"object": "list", "data": [card()]}

    def card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": int(clock()), "owned_by": "llamaduo"}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        try:
            check_auth(request)
            check_model(model_id)
        except APIError as e:
            return error(e)
        return card()

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
                     fallback_model=cfg.service.model, tokenizer=tokenizer)
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
