"""The server's continuous batch: a request's rows join between decode steps and leave when done.

`add` prefills a request's prompt (on its own, unpadded, with the model's attention; the part it
shares with a recent prompt comes from `prefixcache.PrefixCache`), picks each
of its `n` rows' first token and appends the rows to the batch; `step` runs one decode step for
every live row at once (`rowcache.row_attention` reads each row's own cache), picks each row's
next token with that row's settings (`sampling.pick`) and drops the rows that finished. Both
return what the step produced per row as `Event`s. No threads here: `scheduler.py` drives it.

Greedy rows pick exactly what `infer.generate` picks (same prefill, same prompt encoding, fp32
attention over the same keys), so a served greedy answer is the batch-inference answer; a prompt
whose prefix came from the cache had the rest of it run in a shorter forward (see `prefixcache`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from llamaduo.chat_api import ChatRequest
from llamaduo.detokenize import TextStream, logprob_entry, whole_text
from llamaduo.prefixcache import PrefixCache
from llamaduo.rowcache import ATTENTION, RowCache, prefill, register
from llamaduo.sampling import RowSampling, pick, row_generator


@dataclass
class Event:
    """What one row produced since its last event."""

    key: Any  # the request the row belongs to
    index: int  # the row's choice index within its request
    text: str = ""
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Row:
    key: Any
    index: int
    sampling: RowSampling
    text: TextStream
    max_new: int
    prompt_tokens: int
    adapter: str | None
    next: int = -1  # the token the next step feeds
    generated: int = 0
    finished: bool = False


def fresh_seed() -> int:
    """A request without a seed samples differently from the last one."""
    return secrets.randbits(40)  # small enough for `infer.generate` to scale into a torch seed


class RowBatch:
    """The live rows of the server's batch and their cache, over one model."""

    def __init__(self, model: Any, tokenizer: Any, prefix_cache_bytes: int | None = None):
        """`prefix_cache_bytes`: `serve.prefix_cache_mb` in bytes (None: its default; 0: no cache)."""
        from llamaduo.config.serving import ServeConfig
        from llamaduo.infer import stop_token_ids

        if prefix_cache_bytes is None:
            prefix_cache_bytes = int(ServeConfig.model_fields["prefix_cache_mb"].default * 2**20)
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.prefilled = 0  # prompt tokens the last `add` ran through the model (the rest came from the cache)

        register()
        self.model, self.tokenizer = model, tokenizer
        self.eos = set(stop_token_ids(model, tokenizer))
        self.top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
        self.device = next(model.parameters()).device
        # A PEFT model with adapters takes one adapter name per row (PEFT's mixed-adapter batches).
        self.adapters = bool(getattr(model, "peft_config", None))
        self._names: list[str] | None = None
        if self.adapters:
            self._hook_adapter_layers()
        self.cache = RowCache()
        self.rows: list[_Row] = []
        self._decode = whole_text(tokenizer)
        self._unread: dict[int, Any] = {}  # rows -> the empty 4D mask of a decode step with that many rows

    def __len__(self) -> int:
        return len(self.rows)

    def _hook_adapter_layers(self) -> None:
        """Hand each LoRA layer this step's per-row adapter names, as PEFT's `adapter_names=` forward
        argument does; PEFT would walk every module twice per forward to set its hooks up (~10 ms a
        step on the tiny model, more than the step), these are set up once."""
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        def inject(module: Any, args: Any, kwargs: dict) -> Any:
            return None if self._names is None else (args, {**kwargs, "adapter_names": self._names})

        for m in self.model.modules():
            if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper)):
                m.register_forward_pre_hook(inject, with_kwargs=True)

    def _adapters(self, adapters: list[str | None]) -> None:
        """This forward's per-row adapter names (the caller sets them back to None after it)."""
        self._names = [a or "__base__" for a in adapters] if self.adapters else None

    def add(self, key: Any, req: ChatRequest) -> list[Event]:
        """Prefill `req` and add its `req.n` rows; returns the events of their first tokens."""
        import torch

        # The rendered prompt when the chat template itself rendered the tools; else the messages.
        ids = req.prompt_ids(self.tokenizer)
        s = req.sampling
        seed = fresh_seed() if req.seed is None else req.seed
        adapter = getattr(req, "adapter", None)
        self._adapters([adapter])
        try:
            with torch.inference_mode():
                reuse = self.prefixes.lookup(adapter, ids)
                self.prefilled = len(ids) - (reuse.tokens if reuse is not None else 0)
                keys, values, last = prefill(self.model, ids, reuse)
                if reuse is None or not reuse.whole:  # a whole hit is cached already (and now the most recent)
                    self.prefixes.store(adapter, ids, keys, values, last)
                first = last[None].repeat(req.n, 1)
        finally:
            self._names = None
        rows = []
        for j in range(req.n):
            sampling = RowSampling(
                temperature=s.temperature, top_p=s.top_p, logprobs=getattr(req, "logprobs", None),
                generator=row_generator(seed, j) if s.temperature > 0 else None,
                constraint=req.constraint() if getattr(req, "constraint", None) is not None else None,
            )
            rows.append(_Row(key, j, sampling, TextStream(self.tokenizer, list(s.stop), self._decode), s.max_new_tokens, len(ids), adapter))
        self.cache.add(keys, values, copies=len(rows))
        self.rows += rows
        with torch.inference_mode():  # constraints mask the logits in place
            picks = pick(first, [r.sampling for r in rows], self.top_k)
        events = [self._take(r, p) for r, p in zip(rows, picks, strict=True)]
        self._compact()
        return [e for e in events if e is not None]

    def step(self) -> list[Event]:
        """One decode step of every live row."""
        import torch

        from llamaduo.decode import SharedPrefixUnsupported

        if not self.rows:
            return []
        self.cache.begin_step()
        tokens = torch.tensor([[r.next] for r in self.rows], dtype=torch.long, device=self.device)
        positions = self.cache.lengths[:, None]
        if self.model.config._attn_implementation != ATTENTION:
            # Switched once and left so (switching walks every module): prefills and any other use of
            # the model fall through to sdpa (see `rowcache.row_attention`).
            self.model.set_attn_implementation(ATTENTION)
            if self.model.config._attn_implementation != ATTENTION:
                raise SharedPrefixUnsupported(f"{type(self.model).__name__} cannot switch its attention implementation")
        # `row_attention` masks with the cache's own bias; a 4D mask is passed through by transformers'
        # mask builders as is, which spares building (and checking positions for) an sdpa mask nothing reads.
        rows = len(self.rows)
        if (unread := self._unread.get(rows)) is None:
            unread = self._unread[rows] = torch.zeros((rows, 1, 1, 0), dtype=torch.bool, device=self.device)
        self._adapters([r.adapter for r in self.rows])
        try:
            with torch.inference_mode():
                out = self.model(input_ids=tokens, attention_mask=unread, position_ids=positions, use_cache=False,
                                 logits_to_keep=1, row_cache=self.cache)
                self.cache.end_step()
                picks = pick(out.logits[:, -1], [r.sampling for r in self.rows], self.top_k)
        finally:
            self._names = None
        events = [self._take(r, p) for r, p in zip(self.rows, picks, strict=True)]
        self._compact()
        return [e for e in events if e is not None]

    def probe(self) -> None:
        """Decode two tokens of a one-word prompt: raises `SharedPrefixUnsupported` for a model this
        batch cannot decode (then the server generates with `infer.generate` instead)."""
        from llamaduo.config import InferConfig
        from llamaduo.data import Message

        sampling = InferConfig(temperature=0.0, max_new_tokens=2, num_samples=1)
        key = object()
        self.add(key, ChatRequest([Message(role="user", content="hi")], sampling, 0, 1, False, False))
        while len(self):
            self.step()

    def drop(self, key: Any) -> None:
        """Remove a request's rows (its client went away)."""
        for r in self.rows:
            if r.key is key:
                r.finished = True
        self._compact()

    def clear(self) -> list[Any]:
        """Remove every row (after a failed step); returns the requests they belonged to."""
        keys = list({id(r.key): r.key for r in self.rows}.values())
        self.rows, self.cache = [], RowCache()
        return keys

    def _take(self, row: _Row, picked: Any) -> Event | None:
        tok = picked.token
        c = row.sampling.constraint
        if c is not None:
            c.accept(tok)
        finish = None
        entries = None
        if tok in self.eos:
            delta, finish = row.text.finish(), "stop"
        else:
            row.generated += 1
            row.next = tok
            if row.sampling.logprobs is not None:
                entries = [logprob_entry(self.tokenizer, tok, picked.logprob, picked.top or [])]
            delta = row.text.push(tok)
            if row.text.stopped or (c is not None and c.is_finished()):
                finish = "stop"
            elif row.generated >= row.max_new:
                finish = "length"
            if finish is not None:
                delta += row.text.finish()
        if finish is not None:
            row.finished = True
        if not delta and entries is None and finish is None:
            return None
        return Event(
            row.key, row.index, delta, entries, finish, row.generated, row.prompt_tokens,
            [tok] if tok not in self.eos else [],
        )

    def _compact(self) -> None:
        if not any(r.finished for r in self.rows):
            return
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        self.cache.keep(keep)
        self.rows = [self.rows[i] for i in keep]
