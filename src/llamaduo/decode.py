"""The transformers backend's decoding loop: K samples per prompt from one shared prompt prefill.

A batch of left-padded prompts runs through the model once. The K samples of each prompt then
decode together, and their attention reads the prompt's keys and values once for all K (the
prefix) plus each sample's own generated tokens (the suffix, a small cache of its own). Plain
`generate` would instead hold and read K copies of the prompt's cache and copy all of it every
step (`torch.cat`), which is where a small model's decoding time goes.

The prefix is handed to the attention function through the model's forward kwargs, which
transformers passes down to every attention call; the attention implementation is switched to
ours for the decode steps only (the prefill runs the model's own). Prompts whose K samples have
all finished leave the batch, so short answers free their compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

ATTENTION = "llamaduo_shared_prefix"


class SharedPrefixUnsupported(Exception):
    """This model's attention or cache does not fit the shared-prefix loop (use plain `generate`)."""


@dataclass
class SharedPrefix:
    """The prompts' keys and values, as the prefill left them, for the decode steps to read."""

    keys: list[Any]  # per layer [prompts, kv heads, prompt columns, head dim]
    values: list[Any]
    key_positions: Any  # [prompts, prompt columns]: each column's position (left padding is negative)
    lengths: Any  # [prompts]: prompt lengths, the position of the first generated token
    copies: int
    _bias: dict = field(default_factory=dict)

    def select(self, keep: Any) -> None:
        """Keep only the prompts at indices `keep`."""
        self.keys = [k.index_select(0, keep) for k in self.keys]
        self.values = [v.index_select(0, keep) for v in self.values]
        self.key_positions = self.key_positions.index_select(0, keep)
        self.lengths = self.lengths.index_select(0, keep)
        self._bias.clear()

    def prefix_bias(self, generated: int, window: int | None, dtype: Any) -> Any:
        """Additive mask [prompts, 1, 1, columns] for a query at position length + generated - 1."""

        key = (generated, window, dtype)
        if key not in self._bias:
            self._bias.clear() if len(self._bias) > 8 else None
            visible = self.key_positions >= 0
            if window is not None:
                query_pos = self.lengths + generated - 1
                visible &= self.key_positions > (query_pos - window)[:, None]
            self._bias[key] = additive_mask(visible, dtype)
        return self._bias[key]


def additive_mask(visible: Any, dtype: Any) -> Any:
    """[rows, columns] booleans → an additive attention mask [rows, 1, 1, columns]: 0 where a row
    may look, -inf where it may not."""
    import torch

    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill_(~visible, float("-inf"))[:, None, None, :]


def shared_prefix_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    shared_prefix: SharedPrefix | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Attention of one new token per sample over its prompt's shared prefix and its own suffix.

    `query` is [prompts * K, heads, 1, dim]; `key`/`value` are the suffix cache, [prompts * K,
    kv heads, generated, dim]. One softmax runs over prefix and suffix scores together, so the
    result is the attention over the concatenated sequence, computed without building it.
    """
    import torch

    if shared_prefix is None or query.shape[2] != 1:
        raise SharedPrefixUnsupported("the shared-prefix attention only runs decode steps")
    for name in ("s_aux", "position_bias", "sinks"):
        if kwargs.get(name) is not None:
            raise SharedPrefixUnsupported(f"attention with {name} is not supported")
    st = shared_prefix
    kp, vp = st.keys[module.layer_idx], st.values[module.layer_idx]
    n, kv_heads, cols, dim = kp.shape
    rows, heads, _, _ = query.shape
    k, groups, generated = st.copies, heads // kv_heads, key.shape[2]
    scale = scaling if scaling is not None else dim**-0.5
    # The K samples' queries of one prompt, side by side, against that prompt's one prefix.
    q = query.reshape(n, k, kv_heads, groups, dim)
    qp = q.permute(0, 2, 1, 3, 4).reshape(n, kv_heads, k * groups, dim)
    sp = torch.matmul(qp, kp.transpose(-1, -2)).float() * scale  # [n, kv, K*g, cols]
    ss = torch.matmul(query.reshape(rows, kv_heads, groups, dim), key.transpose(-1, -2)).float() * scale
    if softcap is not None:
        sp, ss = torch.tanh(sp / softcap) * softcap, torch.tanh(ss / softcap) * softcap
    sp = sp + st.prefix_bias(generated, sliding_window, sp.dtype)
    if sliding_window is not None and generated > sliding_window - 1:
        # Suffix token s sits at length + s; the query at length + generated - 1.
        ss[..., : generated - sliding_window] = float("-inf")
    sp = sp.reshape(n, kv_heads, k, groups, cols).permute(0, 2, 1, 3, 4).reshape(rows, kv_heads, groups, cols)
    probs = torch.cat([sp, ss], dim=-1).softmax(dim=-1).to(query.dtype)
    pp, ps = probs[..., :cols], probs[..., cols:]
    pp = pp.reshape(n, k, kv_heads, groups, cols).permute(0, 2, 1, 3, 4).reshape(n, kv_heads, k * groups, cols)
    op = torch.matmul(pp, vp).reshape(n, kv_heads, k, groups, -1).permute(0, 2, 1, 3, 4)
    out = op.reshape(rows, kv_heads, groups, -1) + torch.matmul(ps, value)
    return out.reshape(rows, heads, 1, -1).transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, shared_prefix_attention)


@contextmanager
def _attention(model: Any, name: str) -> Iterator[None]:
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise SharedPrefixUnsupported(f"{type(model).__name__} cannot switch its attention implementation")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def decode(
    model: Any,
    input_ids: Any,
    attention_mask: Any,
    copies: int,
    max_new_tokens: int,
    pick: Callable[[Any], Any],
    eos_ids: list[int],
    pad_id: int,
    stop: Callable[[Any], Any] | None = None,
    constraints: list[Any] | None = None,
) -> Any:
    """`copies` continuations of each left-padded prompt: [prompts * copies, max_new_tokens].

    Row i*copies + j is sample j of prompt i. `pick` turns next-token logits [rows, vocab] into
    token ids [rows]; a row ends at an `eos_ids` token (kept) or when `stop` (given the tokens
    generated so far) says so; what follows an end is `pad_id`. `constraints` (one
    `constraint.TokenConstraint` or None per row) mask each row's logits before `pick` and end
    the row when its structure is complete.
    """
    import torch
    from transformers import DynamicCache

    _register()
    n, width = input_ids.shape
    device = input_ids.device
    lengths = attention_mask.long().sum(-1)
    # Each prompt is prefilled on its own: unpadded, the causal kernel skips the masked half and
    # no [prompts, 1, width, width] mask is built; the caches are then laid side by side, left-padded.
    keys: list[Any] = []
    values: list[Any] = []
    last = []
    for r, length in enumerate(lengths.tolist()):
        out = model(input_ids=input_ids[r : r + 1, width - length :], cache=DynamicCache(), use_cache=True, logits_to_keep=1)
        layers = getattr(out.cache, "layers", None) or []
        if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
            raise SharedPrefixUnsupported("the prefill did not leave a key/value cache per layer")
        if not keys:
            keys = [layer.keys.new_zeros((n, *layer.keys.shape[1:2], width, layer.keys.shape[-1])) for layer in layers]
            values = [layer.values.new_zeros((n, *layer.values.shape[1:2], width, layer.values.shape[-1])) for layer in layers]
        for i, layer in enumerate(layers):
            keys[i][r, :, width - length :] = layer.keys[0]
            values[i][r, :, width - length :] = layer.values[0]
        last.append(out.logits[0, -1])
    columns = torch.arange(width, device=device)
    state = SharedPrefix(
        keys=keys, values=values, key_positions=columns[None, :] - (width - lengths)[:, None], lengths=lengths,
        copies=copies,
    )
    result = torch.full((n * copies, max_new_tokens), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(n * copies, device=device)  # the result row of each live row
    done = torch.zeros(n * copies, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids or [-1], device=device)
    suffix = DynamicCache()
    tokens = pick(masked(torch.stack(last).repeat_interleave(copies, dim=0), rows, done, constraints))
    with _attention(model, ATTENTION):
        for step in range(max_new_tokens):
            tokens = tokens.masked_fill(done, pad_id)
            result[rows, step] = tokens
            if constraints is not None:
                done |= accepted(tokens, rows, done, constraints)
            done |= torch.isin(tokens, eos)
            if stop is not None:
                done |= stop(result[rows, : step + 1])
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            finished = done.view(-1, copies).all(dim=1)
            if bool(finished.any()):
                keep = (~finished).nonzero().squeeze(1)
                keep_rows = (keep[:, None] * copies + torch.arange(copies, device=device)).reshape(-1)
                state.select(keep)
                suffix.batch_select_indices(keep_rows)
                rows, done, tokens = rows[keep_rows], done[keep_rows], tokens[keep_rows]
            out = model(
                input_ids=tokens[:, None], position_ids=(state.lengths.repeat_interleave(copies) + step)[:, None],
                cache=suffix, use_cache=True, logits_to_keep=1, shared_prefix=state,
            )
            tokens = pick(masked(out.logits[:, -1], rows, done, constraints))
    return result


# -------------------------------------------------- per-row constraints (grammar-constrained decoding)
def masked(logits: Any, rows: Any, done: Any, constraints: list[Any] | None) -> Any:
    """`logits` [live rows, vocab] with each live constrained row's disallowed tokens at -inf, in place.

    `rows` maps live rows to result rows (the index into `constraints`)."""
    if constraints is not None:
        for i, (r, finished) in enumerate(zip(rows.tolist(), done.tolist(), strict=True)):
            c = constraints[r]
            if c is not None and not finished and not c.is_finished():
                c.mask_logits(logits[i])
    return logits


def accepted(tokens: Any, rows: Any, done: Any, constraints: list[Any]) -> Any:
    """Feed each live row's new token to its constraint; True where the constraint is now complete."""
    import torch

    ended = torch.zeros_like(done)
    for i, (r, t, finished) in enumerate(zip(rows.tolist(), tokens.tolist(), done.tolist(), strict=True)):
        c = constraints[r]
        if c is not None and not finished:
            c.accept(t)
            ended[i] = c.is_finished()
    return ended
