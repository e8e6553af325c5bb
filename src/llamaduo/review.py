"""`llamaduo review RUN_DIR`: a local page where people label the student's candidates.

It lists the judged candidates of the run's rounds worst-first (by the pass rule's metric),
each with its instruction, reference, candidate, the judge's scores and reasons, filterable by
round and category. A reviewer sets a 1-100 score, or agrees / disagrees with the judge's
verdict at the pass threshold, by mouse or keyboard. Each label is merged into
`RUN_DIR/labels.jsonl` at once (`labels.merge_labels`: atomic, locked), the file `llamaduo
calibrate` reads, so labels survive reloads and concurrent tabs.

The server is the same stack as `serve` (FastAPI under uvicorn, `serve.BackgroundServer`) on
127.0.0.1 only. The page (`templates/review.html`) builds every value with `textContent`, so
model output is never HTML, and its CSP allows only its own nonce'd script and style.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request is
# imported inside `create_app`) at definition time.
import secrets
from collections import defaultdict
from html import escape
from importlib import resources
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field

from llamaduo.artifacts import METRICS, Label
from llamaduo.calibrate import candidate_threshold
from llamaduo.config import Config
from llamaduo.data import Example, load_examples
from llamaduo.errors import UserError
from llamaduo.files import read_jsonl
from llamaduo.judge import format_instruction
from llamaduo.labels import merge_labels
from llamaduo.scoring import candidate_means
from llamaduo.store import RunStore

HOST = "127.0.0.1"
MAX_REASONS = 6


class LabelIn(BaseModel):
    """What the page posts for one candidate: a score, an agree/disagree, or both."""

    model_config = ConfigDict(extra="forbid")
    round: int = Field(..., ge=0)
    prompt_id: str
    sample_index: int = Field(..., ge=0)
    score: int | None = Field(None, ge=1, le=100)
    agree: bool | None = None


def review_items(cfg: Config, store: RunStore) -> list[dict[str, Any]]:
    """Every judged candidate of every round, worst-first by the pass metric (unjudged last)."""
    rule = cfg.judge.pass_rule.judged()  # judge scores only
    threshold = candidate_threshold(rule)
    tests: dict[str, Example] = {ex.id: ex for ex in load_examples(store.test_path)} if store.test_path.exists() else {}
    labels = {(r.get("round"), r.get("prompt_id"), r.get("sample_index")): r
              for r in (read_jsonl(store.labels_path) if store.labels_path.exists() else [])}
    items = []
    for r in store.rounds():
        if not (store.judgments_path(r).exists() and store.predictions_path(r).exists()):
            continue
        judgments = store.read_judgments(r)
        means = candidate_means(judgments)
        reasons: dict[tuple[str, int], list[dict[str, str]]] = defaultdict(list)
        for j in judgments:
            for mt in METRICS:
                text = getattr(j, f"{mt}_reason")
                entry = {"judge": j.judge_model, "metric": mt, "reason": text or ""}
                if text and entry not in reasons[(j.prompt_id, j.sample_index)]:
                    reasons[(j.prompt_id, j.sample_index)].append(entry)
        for p in store.read_predictions(r):
            key = (p.prompt_id, p.sample_index)
            ex = tests.get(p.prompt_id)
            scores = {mt: round(means[mt][key], 1) for mt in METRICS if key in means[mt]}
            score = scores.get(rule.metric)
            items.append({
                "round": r, "prompt_id": p.prompt_id, "sample_index": p.sample_index,
                "category": ex.category if ex else "n/a",
                "instruction": format_instruction(ex.prompt_messages) if ex else "n/a",
                "reference": ex.response if ex else "n/a",
                "candidate": p.text, "length_cut": p.finish_reason == "length",
                "scores": scores, "judge_pass": None if score is None else score >= threshold,
                "reasons": reasons.get(key, [])[:MAX_REASONS],
                "label": labels.get((r, p.prompt_id, p.sample_index)),
            })
    items.sort(key=lambda it: (it["scores"].get(rule.metric) is None, it["scores"].get(rule.metric) or 0.0,
                               it["round"], it["prompt_id"], it["sample_index"]))
    return items


def page(title: str, nonce: str) -> str:
    text = resources.files("llamaduo").joinpath("templates/review.html").read_text(encoding="utf-8")
    return text.replace("{{TITLE}}", escape(title, quote=True)).replace("{{NONCE}}", nonce)


def create_app(cfg: Config, store: RunStore) -> Any:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="llamaduo review", docs_url=None, redoc_url=None, openapi_url=None)
    rule = cfg.judge.pass_rule.judged()  # judge scores only

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
               "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return HTMLResponse(page(f"llamaduo review: {store.root.name}", nonce), headers={"Content-Security-Policy": csp})

    @app.get("/api/items")
    def items(round: int | None = None, category: str | None = None) -> JSONResponse:
        try:
            everything = review_items(cfg, store)
        except UserError as e:
            raise HTTPException(500, str(e)) from None
        shown = [it for it in everything
                 if (round is None or it["round"] == round) and (category is None or it["category"] == category)]
        return JSONResponse({
            "run": store.root.name, "metric": rule.metric, "threshold": candidate_threshold(rule),
            "rounds": sorted({it["round"] for it in everything}),
            "categories": sorted({it["category"] for it in everything}), "items": shown,
        })

    @app.post("/api/labels")
    async def post_label(request: Request, body: LabelIn) -> JSONResponse:
        origin = request.headers.get("origin")
        if origin and urlparse(origin).netloc != request.headers.get("host"):
            raise HTTPException(403, f"origin {origin} may not write labels")  # another site, via the browser
        found = next((it for it in review_items(cfg, store) if (it["round"], it["prompt_id"], it["sample_index"])
                      == (body.round, body.prompt_id, body.sample_index)), None)
        if found is None:
            raise HTTPException(404, f"no candidate r{body.round:02d} {body.prompt_id} sample {body.sample_index}")
        fields: dict[str, Any] = {"round": body.round, "prompt_id": body.prompt_id, "sample_index": body.sample_index}
        if body.score is None and body.agree is None:
            raise HTTPException(422, "give score (1-100) or agree (true/false)")
        if body.score is not None:
            fields["score"] = body.score
        if body.agree is not None:
            if found["judge_pass"] is None:
                raise HTTPException(422, "this candidate has no judge verdict to agree with; give a score")
            fields["agree"] = body.agree
            fields["passed"] = found["judge_pass"] if body.agree else not found["judge_pass"]
        import time

        fields["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rows = merge_labels(store, [Label.model_validate(fields)])  # only the fields set now: merged on disk
        saved = next(r for r in rows if (r.get("round"), r.get("prompt_id"), r.get("sample_index"))
                     == (body.round, body.prompt_id, body.sample_index))
        return JSONResponse({"label": saved})

    @app.get("/api/labels")
    def labels() -> JSONResponse:
        return JSONResponse({"labels": read_jsonl(store.labels_path) if store.labels_path.exists() else []})

    return app


class ReviewServer:
    """The review app in a background thread (`serve.BackgroundServer`) with its page's address."""

    def __init__(self, cfg: Config, store: RunStore, port: int = 0):
        from llamaduo.serve import BackgroundServer, bind_port

        sock, self.port = bind_port(HOST, port) if port else (None, 0)
        self.server = BackgroundServer(create_app(cfg, store), HOST, self.port, sock=sock)

    def start(self) -> "ReviewServer":
        self.server.start()
        self.port = self.server.port
        return self

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def wait(self) -> None:
        self.server.wait()

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> "ReviewServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(cfg: Config, store: RunStore, port: int = 0) -> ReviewServer:
    """Serve the review page of `store` on 127.0.0.1 (`port`, or the next free one; 0: any)."""
    return ReviewServer(cfg, store, port).start()
