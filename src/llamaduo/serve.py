"""OpenAI-compatible server for deployed models: `POST /v1/chat/completions`, `GET /v1/models`,
`GET /health`.

The application keeps its OpenAI client and changes only `base_url`. The local model's requests
share one continuously refilled batch (`scheduler.py`): a request joins at the next decode step
and its tokens are streamed as they are produced (`stream: true`, OpenAI's chunk format from
`chat_api.py`, ending with `data: [DONE]`); a client that goes away leaves the batch. Several runs
fine-tuned from one base are served from one process under their own names, one LoRA adapter
each on the shared base (`served.py`). A plain generator function (a test double, another
backend) is batched per sampling group instead (`batcher.py`) and answers whole.
`response_format` and forced tool calls decode under a grammar (`grammar.py`), applied per row of
the batch; tools are rendered into the prompt and read back as `tool_calls` (`tools.py`).

With a fallback client, a request whose local generation raises or exceeds
`latency_budget_s` (the first token, when streaming) is answered by the service LLM instead
(`fallback.py`), marked with `"llamaduo_fallback": true` in the body and `x-llamaduo-served-by: service`.

GPU route: the merged directory written by `llamaduo deploy` is a plain Hugging Face model
with its chat template, so vLLM's own OpenAI-compatible server serves it as is:
`vllm serve runs/<name>/deploy/merged` (its switches for tools and LoRA adapters: docs/serving.md).
"""

import asyncio
import contextlib
import hmac
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaduo.background import BackgroundServer, bind_port
from llamaduo.batcher import Batcher, Generator, local_generator
from llamaduo.chat_api import (
    APIError,
    ChatRequest,
    Choice,
    completion_body,
    parse_chat_request,
    read_tool_calls,
    stream_events,
)
from llamaduo.config import Config, InferConfig, ServeConfig
from llamaduo.errors import UserError
from llamaduo.fallback import cannot_carry
from llamaduo.fallback import from_service as fallback_answer
from llamaduo.grammar import Grammars
from llamaduo.request_flow import fit_context, requested_model, structure, tokens_as_sse, watch_disconnect
from llamaduo.scheduler import Scheduler, Stream, StreamClosed
from llamaduo.served import ServedModel, load_served, resolve_model_dir

if TYPE_CHECKING:
    from llamaduo.drift import DriftMonitor
    from llamaduo.metrics import ServeMetrics
    from llamaduo.service import Client
    from llamaduo.shadow import ShadowSender

__all__ = ["BackgroundServer", "ServedModel", "bind_port", "build_app", "create_app", "resolve_model_dir", "serve",
           "start_background"]

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
    generator: "Generator | Scheduler",
    cfg: ServeConfig,
    model_name: str,
    fallback_client: "Client | None" = None,
    clock: Callable[[], float] = time.time,
    *,
    defaults: InferConfig | None = None,
    fallback_model: str | None = None,
    models: Sequence[ServedModel] | None = None,
    shadow: "ShadowSender | dict[str, ShadowSender] | None" = None,
    drift: "DriftMonitor | dict[str, DriftMonitor] | None" = None,
    metrics: "ServeMetrics | None" = None,
    tokenizer: Any = None,
    context_length: int | None = None,
):
    """The FastAPI app. `defaults` fills sampling fields a request leaves out (the run's infer config).

    `generator` is the local model's `Scheduler`, or a plain `Generator` function (batched per
    sampling group). `fallback_client` is a `service.ServiceClient` (anything with an async
    `chat_text`); it is used only when `cfg.fallback` is true. `models` lists every served name with
    its own adapter, settings and fallback (default: `model_name` alone with `cfg` and `defaults`);
    a request naming none of several served models is a 404. `shadow` (started by the lifespan) is
    offered every locally answered request; while `drift` says drifted and fallback is on, the service
    answers (a sampled share still runs locally, off the request path, for the judge). Either may be
    given per served name (each run watched by its own monitoring); one alone watches every name. `metrics`
    backs `GET /metrics`. `tokenizer` (the engine's) enables structured output and tools: without
    it, a request that needs a grammar is a 400.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    served = list(models or [ServedModel(model_name, None, cfg, defaults, fallback_client, fallback_model)])
    keys = {m.name: _bearer_key(m.serve or cfg) for m in served}
    by_name = {m.name: m for m in served}
    max_body = max((m.serve or cfg).max_body_bytes for m in served)
    engine = generator if isinstance(generator, Scheduler) else Batcher(generator, cfg.max_batch, cfg.batch_wait_ms / 1000.0)
    from llamaduo.metrics import MetricsMiddleware, ServeMetrics

    shadows = shadow if isinstance(shadow, dict) else {m.name: shadow for m in served} if shadow is not None else {}
    drifts = drift if isinstance(drift, dict) else {m.name: drift for m in served} if drift is not None else {}
    senders = list({id(sh): sh for sh in shadows.values()}.values())
    metrics = metrics or ServeMetrics()
    metrics.watch(engine, shadows, drifts)
    for sh in senders:
        sh.busy = metrics.busy  # shadow work waits while requests are being answered

    def fallback_of(m: ServedModel) -> "tuple[Client | None, str]":
        client = m.fallback_client if (m.serve or cfg).fallback else None
        name = m.fallback_model or getattr(getattr(client, "cfg", None), "model", None) or "service"
        return client, name
    grammars = Grammars(tokenizer) if tokenizer is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        for sh in senders:
            sh.start()
        # The grammar engine reads the vocabulary once, in the background, before the first JSON request.
        warming = asyncio.create_task(asyncio.to_thread(grammars.warm)) if grammars is not None else None
        try:
            yield
        finally:
            if warming is not None:
                with contextlib.suppress(Exception):
                    await warming
            await engine.stop()
            for sh in senders:
                await asyncio.to_thread(sh.stop)

    app = FastAPI(title="llamaduo", lifespan=lifespan)
    app.add_middleware(MetricsMiddleware, metrics=metrics, model=served[0].name,
                       service_model=fallback_of(served[0])[1])
    app.state.batcher = engine
    app.state.fallbacks = 0

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(APIError(exc.status_code, str(exc.detail), None, None))

    def authorized(request: Request, name: str) -> bool:
        key = keys[name]
        if key is None:
            return True
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        return hmac.compare_digest(token.encode(), key.encode())

    def check_auth(request: Request, name: str) -> None:
        if not authorized(request, name):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", None, "invalid_api_key")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise APIError(413, f"request body over {max_body} bytes", None, "request_too_large")
        buf = bytearray()
        async for part in request.stream():
            buf += part
            if len(buf) > max_body:
                raise APIError(413, f"request body over {max_body} bytes", None, "request_too_large")
        return bytes(buf)

    def pick_model(name: str | None) -> ServedModel:
        if name is None:
            return served[0]  # a request that names no model gets the (first) served one
        if name in by_name:
            return by_name[name]
        raise APIError(404, f"The model {name!r} does not exist; served: {', '.join(by_name)}", "model",
                       "model_not_found")

    async def from_service(m: ServedModel, req: ChatRequest, reason: str) -> list[Choice]:
        client, name = fallback_of(m)
        app.state.fallbacks += 1
        metrics.fallback(reason)
        return await fallback_answer(client, name, req, reason)

    async def start(m: ServedModel, req: ChatRequest, request: Request) -> tuple[Stream | None, Any, bool]:
        """(stream, its first events | the whole answer, served by fallback). Errors before the first
        token (or the whole answer, when not streaming) go to the fallback or become a 500."""
        client, _ = fallback_of(m)
        drift, shadow = drifts.get(m.name), shadows.get(m.name)  # this run's own monitoring
        if client is not None and drift is not None and drift.drifted and cannot_carry(client, req) is None:
            choices = await from_service(m, req, f"drift: {drift.state.reason}")
            if shadow is not None and shadow.sample():  # the judge keeps watching the local model
                local = asyncio.ensure_future(engine.submit(req).result())
                shadow.probe(local, req, choices[0].text, m.name)
            return None, choices, True
        budget = (m.serve or cfg).latency_budget_s if client is not None else None
        deadline = (m.serve or cfg).request_timeout_s
        limit = min((x for x in (budget, deadline) if x is not None), default=None)
        stream = engine.submit(req)
        stream.deadline = None if deadline is None else time.monotonic() + deadline
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(request.receive, stream))
        try:
            got = await asyncio.wait_for(stream.next() if req.stream else stream.result(), limit)
            return stream, got, False
        except (asyncio.TimeoutError, TimeoutError):
            stream.cancel()  # a request not yet started is skipped; a running one leaves the batch
            if budget is None or limit != budget:
                raise APIError(504, f"the request ran past its deadline (serve.request_timeout_s={deadline:g})",
                               None, "timeout", "server_error") from None
            return None, await from_service(m, req, f"local generation over the {budget:g}s latency budget"), True
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except StreamClosed:
            raise APIError(499, "the client closed the request", None, "client_closed") from None
        except Exception as e:
            if client is None:
                log.exception("local generation failed")
                raise APIError(500, f"local generation failed: {type(e).__name__}: {e}", None, "generation_failed",
                               "server_error") from None
            return None, await from_service(m, req, f"local generation failed: {type(e).__name__}: {e}"), True
        finally:
            if not req.stream or stream.cancelled:
                watcher.cancel()
            else:
                stream.watcher = watcher

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            raw = await read_body(request)
            m = pick_model(requested_model(raw))
            check_auth(request, m.name)
            req = parse_chat_request(raw, m.serve or cfg, m.defaults or defaults or InferConfig())
            req.adapter = m.adapter
            if req.logprobs is not None and not isinstance(engine, Scheduler):
                raise APIError(400, "logprobs are not computed by this server's engine", "logprobs", "unsupported_parameter")
            await fit_context(req, tokenizer, context_length)  # a long prompt: off the loop
            await structure(req, tokenizer, grammars)
            t0 = time.perf_counter()
            stream, got, used_fallback = await start(m, req, request)
        except APIError as e:
            return error(e)
        if used_fallback or not req.stream:
            answered = [read_tool_calls(c, req) for c in (got if used_fallback else stream.choices)]
            metrics.answered(fallback_of(m)[1] if used_fallback else m.name, answered, time.perf_counter() - t0)
            if (sh := shadows.get(m.name)) is not None and not used_fallback:  # queued, never awaited
                sh.offer(req, answered[0].text, model=m.name, latency_ms=(time.perf_counter() - t0) * 1000)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(clock())
        name = fallback_of(m)[1] if used_fallback else m.name
        headers = {"x-llamaduo-served-by": "service" if used_fallback else "local"}
        if used_fallback or not req.stream:
            choices = answered
            if req.stream:
                events = stream_events(rid, created, name, choices, used_fallback, req.include_usage)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            return JSONResponse(completion_body(rid, created, name, choices, used_fallback), headers=headers)
        metrics.ttft.labels(m.name).observe(time.perf_counter() - t0)  # its first tokens are ready now

        def streamed(choices: list[Choice]) -> None:  # the whole answer has gone out
            metrics.counted(m.name, choices)
            if (sh := shadows.get(m.name)) is not None:
                answer = read_tool_calls(choices[0], req).text  # what the non-streamed path offers
                sh.offer(req, answer, model=m.name, latency_ms=(time.perf_counter() - t0) * 1000)

        return tokens_as_sse(rid, created, name, stream, got, streamed, headers)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        from fastapi.responses import Response

        from llamaduo.metrics import CONTENT_TYPE

        if not cfg.metrics_public and not any(authorized(request, m.name) for m in served):
            return error(APIError(401, "invalid or missing API key (send Authorization: Bearer <key>; or set "
                                  "serve.metrics_public)", None, "invalid_api_key"))

        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request):
        visible = [m for m in served if authorized(request, m.name)]
        if not visible:
            return error(APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", None,
                                  "invalid_api_key"))
        cards = [{"id": m.name, "object": "model", "created": int(clock()), "owned_by": "llamaduo"} for m in visible]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str, request: Request):
        if model_id not in by_name:
            return error(APIError(404, f"The model {model_id!r} does not exist; served: {', '.join(by_name)}", "model",
                                  "model_not_found"))
        if not authorized(request, model_id):
            return error(APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", None,
                                  "invalid_api_key"))
        return {"id": model_id, "object": "model", "created": int(clock()), "owned_by": "llamaduo"}

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": served[0].name,
            "models": [m.name for m in served],
            "queued": engine.queued,
            "batches": engine.stats.batches,
            "fallback": any(fallback_of(m)[0] is not None for m in served),
            "fallbacks": app.state.fallbacks,
        }

    return app


def local_engine(model: Any, tokenizer: Any, max_batch: int, stream_interval_s: float | None = None,
                 prefix_cache_mb: float | None = None) -> "Scheduler | Generator":
    """The continuous batch over `model`, or (an architecture it cannot decode) batched `generate`;
    `stream_interval_s` and `prefix_cache_mb` as `serve.stream_interval_ms` and `serve.prefix_cache_mb` (None:
    their defaults). Torch's threads as set before (`infer.serving_threads`)."""
    from llamaduo.decode import SharedPrefixUnsupported
    from llamaduo.infer import release_thread_pool

    # The generation thread holds the GIL between torch ops; at the default 5 ms switch interval the
    # event loop (reading requests, sending every stream's chunks) waits that long each time it wakes.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
    cache = None if prefix_cache_mb is None else int(prefix_cache_mb * 2**20)
    scheduler = Scheduler(model, tokenizer, max_batch, stream_interval_s, cache)
    try:
        scheduler.batch.probe()
    except SharedPrefixUnsupported as e:
        log.warning("%s: serving with batched `generate`, whole answers (%s)", type(model).__name__, e)
        return local_generator(model, tokenizer)
    finally:  # loading and the probe ran here; the generating thread's pool is then the only one
        release_thread_pool()
    return scheduler


def build_app(model_or_run_dirs: "Path | Sequence[Path]", cfg: Config, overrides: list[str] | None = None):
    """Load what `model_or_run_dirs` deploy (one model, or several runs' adapters on their shared
    base) and build the app; returns (app, the first served name)."""
    one = isinstance(model_or_run_dirs, (str, Path))
    paths = [Path(model_or_run_dirs)] if one else [Path(p) for p in model_or_run_dirs]
    model, tokenizer, served = load_served(paths, cfg, overrides)
    from llamaduo.infer import serving_threads

    serving_threads(model)
    engine = local_engine(model, tokenizer, cfg.serve.max_batch, cfg.serve.stream_interval_ms / 1000,
                          cfg.serve.prefix_cache_mb)
    shadow: dict[str, Any] = {}
    drift: dict[str, Any] = {}
    if cfg.serve.shadow_rate > 0:  # each served run is watched by its own monitoring store and judge
        from llamaduo.shadow import for_run

        for path, m in zip(paths, served, strict=True):
            # the run's judge and target; the server's shadow settings (`--shadow` applies to every run)
            run_cfg = (m.config or cfg).model_copy(update={"serve": cfg.serve})
            shadow[m.name], drift[m.name] = for_run(run_cfg, path)
    app = create_app(engine, cfg.serve, served[0].name, defaults=cfg.infer, models=served, shadow=shadow, drift=drift,
                     tokenizer=tokenizer, context_length=getattr(model.config, "max_position_embeddings", None))
    return app, served[0].name


def start_background(
    model_or_run_dir: "Path | Sequence[Path]", cfg: Config, host: str | None = None, port: int = 0, sock: Any = None
) -> "BackgroundServer":
    """Serve deployed models from a background thread (for the demo and tests)."""
    app, name = build_app(model_or_run_dir, cfg)
    return BackgroundServer(app, host or cfg.serve.host, port, model_name=name, sock=sock).start()


def serve(
    model_or_run_dirs: "Path | Sequence[Path]", cfg: Config, host: str | None = None, port: int | None = None,
    overrides: list[str] | None = None,
) -> None:
    """Serve a deployed model, or several runs on their shared base, until interrupted.

    `cfg` is the first run's config; every further run answers with its own (plus `overrides`)."""
    import uvicorn

    host = host or cfg.serve.host
    port = cfg.serve.port if port is None else port
    if host not in ("127.0.0.1", "localhost", "::1") and cfg.serve.api_key_env is None:
        log.warning("serving on %s without an API key (set serve.api_key_env)", host)
    app, name = build_app(model_or_run_dirs, cfg, overrides)
    log.info("serving %s on http://%s:%s/v1", name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
