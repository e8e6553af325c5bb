"""Grammar-constrained decoding with xgrammar: JSON objects, JSON schemas and forced tool calls.

`GrammarSpec` says what an answer must be (built from a request by `chat_api`, no tokenizer
needed); `Grammars` compiles it once per tokenizer against that tokenizer's vocabulary (cached
per spec) and hands out a `ConstraintFactory`; each `GrammarConstraint` it makes guides one
sequence through the `constraint.TokenConstraint` protocol the decode loop applies.

JSON is generated without free whitespace (`{"a": 1, "b": [2]}`, json.dumps' separators): an
untrained model would otherwise fill the budget with blanks. Strings and numbers are still
unbounded, so each constraint also watches its token budget: once the shortest way to close
the structure from where it stands (found by walking the matcher itself, see `_closing`) only
just fits in the tokens left, it emits exactly that and the end-of-turn token. An answer that
reaches `max_tokens` is therefore still valid JSON whenever the budget can hold the smallest
document at all; when it cannot, the answer ends with `length` and the text as it stands.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from typing import Any

from llamaduo.constraint import ConstraintFactory
from llamaduo.tools import TOOL_CALL_END, TOOL_CALL_SEPARATOR, tool_call_prefix

SAFETY = 3  # tokens of slack kept when deciding to close (a plan can grow by a token or two a step)
RECHECK_EVERY = 8  # at most this many steps between closing plans
DENSE = 12  # within this many tokens of needing to close, plan at every step
MAX_PLAN = 512  # closing plans longer than this are given up on (tried again a few steps later)


class GrammarError(ValueError):
    """A schema that is not valid JSON Schema, or uses what the grammar engine cannot enforce."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a constrained answer must be: JSON of `schema`, a tool call, or either.

    `schema` is canonical JSON text (`{"type": "object"}` for `json_object`); `tools` holds
    (name, parameters JSON) for each function the answer may call; `tools_required` forbids
    answering without a call, and `parallel` allows more than one.
    """

    schema: str | None = None
    strict: bool = True
    tools: tuple[tuple[str, str], ...] = ()
    tools_required: bool = False
    parallel: bool = True


def canonical(schema: Any) -> str:
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))  # property order is meaningful


def check_schema(schema: Any) -> None:
    """Raise GrammarError unless `schema` is a JSON Schema the grammar engine can enforce."""
    if not isinstance(schema, dict):
        raise GrammarError("must be a JSON Schema object")
    _check_text(canonical(schema))


@functools.lru_cache(maxsize=1024)
def _check_text(text: str) -> None:
    """The checks of one schema, once: every record or request of a task repeats the same schemas, and
    building the grammar takes milliseconds (a failure raises, which is not cached)."""
    schema = json.loads(text)
    try:
        from jsonschema.validators import validator_for

        validator_for(schema).check_schema(schema)
    except ImportError:  # the grammar engine's own checks below still apply
        pass
    except Exception as e:  # jsonschema.SchemaError; its message names the offending keyword
        raise GrammarError(f"is not a valid JSON Schema: {getattr(e, 'message', e)}") from None
    try:
        import xgrammar as xgr
    except ImportError:
        raise GrammarError("cannot be enforced: the grammar engine is not installed (pip install 'llamaduo[serve]')") from None
    try:
        xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except Exception as e:  # RuntimeError with the converter's reason (unsupported type, dangling $ref ...)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise GrammarError(f"cannot be enforced: {reason.split(': ', 1)[-1]}") from None


# ------------------------------------------------------------------ vocabulary
class _Vocab:
    """The tokenizer as the grammar engine sees it, plus byte lookups for closing plans."""

    def __init__(self, tokenizer: Any, stop_token_ids: list[int] | None):
        import xgrammar as xgr

        stop = stop_token_ids or [tokenizer.eos_token_id]
        base = xgr.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=stop)
        # Special and added control tokens (pad, <|im_start|>) keep their text in the vocabulary
        # xgrammar reads, which would let them appear inside JSON strings; blanked, they never can.
        special = {i for i in getattr(tokenizer, "all_special_ids", []) if i not in stop}
        special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special and i not in stop}
        vocab = [""] * base.vocab_size
        for token, idx in tokenizer.get_vocab().items():
            if idx < base.vocab_size and idx not in special:
                vocab[idx] = token
        self.info = xgr.TokenizerInfo.from_vocab_and_metadata(vocab, base.dump_metadata())
        self.size = self.info.vocab_size
        self.stop_ids = list(self.info.stop_token_ids)
        skip = set(self.info.special_token_ids) | set(self.stop_ids) | special
        self.by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(self.info.decoded_vocab):
            if b and i not in skip:
                self.by_bytes.setdefault(bytes(b), i)
        self.longest = max((len(b) for b in self.by_bytes), default=1)
        self._spelled: dict[bytes, list[int] | None] = {}  # forced texts (keys, tags) recur in every row
        one = {b: self.by_bytes.get(b) for b in (bytes([c]) for c in range(256))}
        printable = [t for c in range(32, 127) if (t := one[bytes([c])]) is not None]
        continuation = [t for c in range(0x80, 0xC0) if (t := one[bytes([c])]) is not None]
        # A probe: `q` is accepted inside a string and nowhere else in JSON's structure.
        self.probe = one[b"q"]
        # Inside a string: close it. Outside: close a container, else end the value (`,` also ends
        # a number, which digits never would), else start the shortest value.
        self.in_string = [t for t in [one[b'"']] if t is not None] + printable + continuation
        self.structure = [one[bytes([c])] for c in b'}]",0{[tfn:-'] + printable + continuation
        self.structure = [t for t in self.structure if t is not None]

    def tokens_for(self, text: bytes) -> list[int] | None:
        """Greedy longest-match tokens spelling `text` byte for byte (None if some byte has no token)."""
        if text not in self._spelled:
            if len(self._spelled) > 4096:
                self._spelled.clear()
            self._spelled[text] = self._spell(text)
        return self._spelled[text]

    def _spell(self, text: bytes) -> list[int] | None:
        out, i = [], 0
        while i < len(text):
            for n in range(min(self.longest, len(text) - i), 0, -1):
                t = self.by_bytes.get(text[i : i + n])
                if t is not None:
                    out.append(t)
                    i += n
                    break
            else:
                return None
        return out


def _closing(matcher: Any, vocab: _Vocab) -> list[int] | None:
    """Tokens that complete the grammar from `matcher`'s state, shortest-first by construction:
    forced text as it stands, otherwise close what is open. None when no plan is found."""
    m = matcher.fork()
    plan: list[int] = []
    while len(plan) < MAX_PLAN:
        if m.is_completed():
            return plan
        forced = m.find_jump_forward_string()
        if forced:
            toks = vocab.tokens_for(forced.encode("utf-8"))
            if not toks or not all(m.accept_token(t) for t in toks):
                return None
            plan.extend(toks)
            continue
        inside = vocab.probe is not None and m.fork().accept_token(vocab.probe)
        for t in vocab.in_string if inside else vocab.structure:
            if m.accept_token(t):
                plan.append(t)
                break
        else:
            return None
    return None


# ------------------------------------------------------------------ constraints
class GrammarConstraint:
    """One sequence's grammar state; a `constraint.TokenConstraint`."""

    def __init__(self, compiled: Any, vocab: _Vocab, max_tokens: int):
        import xgrammar as xgr

        self._xgr = xgr
        self._m = xgr.GrammarMatcher(compiled)
        self._vocab = vocab
        self._bitmask = xgr.allocate_token_bitmask(1, vocab.size)
        self._left = max_tokens
        self._steps = 0
        self._check_at = max_tokens  # plan at the first step: how long the smallest answer is
        self._plan: list[int] | None = None

    def _consider_closing(self) -> None:
        plan = _closing(self._m, self._vocab)
        if plan is None:  # no way out found from here; try again after the model moved on
            self._check_at = self._left - RECHECK_EVERY
            return
        need = len(plan) + 1 + SAFETY  # the plan, the end-of-turn token, slack
        if not plan and self._another_call() >= self._left:
            self._plan = plan  # the answer may end here, and one more call would not fit: end it
            return
        if need >= self._left:
            self._plan = plan
        # Plan again when half the distance to the budget is gone (every step near the end): a
        # plan grows by a token or so a step, so checks get dense only close to the end.
        self._check_at = need + max(DENSE, (self._left - need) // 2)

    def _another_call(self) -> int:
        """Tokens one more call after the separator needs at the least (a whole block appears at once
        when the model picks the separator, more than a plan grows by in a step)."""
        sep = self._vocab.tokens_for(TOOL_CALL_SEPARATOR.encode())
        m = self._m.fork()
        if not sep or not all(m.accept_token(t) for t in sep):
            return 0  # nothing can follow
        plan = _closing(m, self._vocab)
        return len(sep) + len(plan) + 1 + SAFETY if plan is not None else self._left

    def mask_logits(self, logits: Any) -> None:
        # Where the answer could end (between parallel calls) is also where the budget is weighed.
        if self._plan is None and (self._left <= self._check_at or self._steps % RECHECK_EVERY == 0
                                   or self._m.is_completed()):
            self._consider_closing()
        if self._plan is not None:
            allowed = self._plan[:1] or self._vocab.stop_ids
            keep = logits[allowed].clone()
            logits.fill_(float("-inf"))
            logits[allowed] = keep
            return
        if self._m.fill_next_token_bitmask(self._bitmask):
            n = min(self._vocab.size, logits.shape[-1])
            mask = self._bitmask[0] if logits.device.type == "cpu" else self._bitmask[0].to(logits.device)
            self._xgr.apply_token_bitmask_inplace(logits[:n], mask, vocab_size=n)
        if logits.shape[-1] > self._vocab.size:
            logits[self._vocab.size :] = float("-inf")  # the model's padding rows have no token

    def accept(self, token_id: int) -> None:
        if self._m.is_terminated():
            return
        if not self._m.accept_token(int(token_id)):
            raise RuntimeError(f"token {token_id} was chosen against the grammar (masking was not applied)")
        self._left -= 1
        self._steps += 1
        if self._plan:
            self._plan.pop(0)

    def is_finished(self) -> bool:
        return self._m.is_terminated()


class Grammars:
    """The grammar engine for one tokenizer: compiles `GrammarSpec`s (each once) into constraint factories."""

    def __init__(self, tokenizer: Any, stop_token_ids: list[int] | None = None, max_threads: int = 1):
        self.tokenizer = tokenizer
        self._stop = stop_token_ids
        self._threads = max_threads
        self._vocab: _Vocab | None = None
        self._compiler: Any = None
        self._compiled: dict[GrammarSpec, Any] = {}
        self._lock = threading.Lock()

    def _ready(self) -> None:
        if self._compiler is None:
            import xgrammar as xgr

            self._vocab = _Vocab(self.tokenizer, self._stop)
            self._compiler = xgr.GrammarCompiler(self._vocab.info, max_threads=self._threads)

    def warm(self) -> None:
        """Read the vocabulary now (about 2 s for Gemma's 262k tokens on 2 vCPU) instead of at the first request."""
        with self._lock:
            self._ready()

    def compile(self, spec: GrammarSpec) -> Any:
        with self._lock:
            if spec not in self._compiled:
                self._ready()
                self._compiled[spec] = _compile(self._compiler, spec)
            return self._compiled[spec]

    def factory(self, spec: GrammarSpec, max_tokens: int) -> ConstraintFactory:
        """Fresh constraints for sequences of at most `max_tokens` tokens under `spec`."""
        compiled = self.compile(spec)
        vocab = self._vocab
        assert vocab is not None
        return lambda: GrammarConstraint(compiled, vocab, max_tokens)


def structural_tag(spec: GrammarSpec) -> Any:
    """The xgrammar structural tag of a spec with tools: `<tool_call>` blocks (one or more, or one
    when not parallel), or — under `auto` with a response schema — either blocks or that JSON.
    vLLM's guided decoding takes the same tag (as JSON), so both backends enforce one grammar."""
    from xgrammar.structural_tag import (
        JSONSchemaFormat,
        OrFormat,
        StructuralTag,
        TagFormat,
        TagsWithSeparatorFormat,
    )

    tags = [
        TagFormat(
            begin=tool_call_prefix(name),
            # Arguments allow at most one blank in a row: the tag's JSON has no whitespace-free mode.
            content=JSONSchemaFormat(json_schema=json.loads(params), max_whitespace_cnt=1),
            end=TOOL_CALL_END,
        )
        for name, params in spec.tools
    ]
    calls = TagsWithSeparatorFormat(tags=tags, separator=TOOL_CALL_SEPARATOR, at_least_one=True,
                                    stop_after_first=not spec.parallel)
    if spec.tools_required or spec.schema is None:
        return StructuralTag(format=calls)
    answer = JSONSchemaFormat(json_schema=json.loads(spec.schema), max_whitespace_cnt=1)
    return StructuralTag(format=OrFormat(elements=[calls, answer]))


def _compile(compiler: Any, spec: GrammarSpec) -> Any:
    if not spec.tools:
        assert spec.schema is not None, "a GrammarSpec constrains to a schema, tool calls, or both"
        return compiler.compile_json_schema(spec.schema, any_whitespace=False, strict_mode=spec.strict)
    return compiler.compile_structural_tag(structural_tag(spec))
