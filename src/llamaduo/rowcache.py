"""The key/value cache of the server's continuous batch, and the attention that reads it.

Each live row (one generated sequence) holds its prompt and generated tokens' keys and values
in one tensor per layer, [rows, kv heads, capacity, head dim]; rows have different lengths
(they joined the batch at different steps), so a row's valid columns are `0 .. lengths[row]`.
A decode step feeds one new token per row: the attention writes its key and value at column
`lengths[row]` and attends over that row's columns only (a sliding-window layer over its window).
Rows join (their prefill's cache is copied in) and leave (the rest are compacted) between steps.

The model runs without a transformers cache for these steps; this attention is handed the
`RowCache` through the forward kwargs, as `decode.shared_prefix_attention` is handed its prefix.
"""

from __future__ import annotations

from typing import Any

from llamaduo.decode import additive_mask

ATTENTION = "llamaduo_rows"


class RowCache:
    """Keys and values of every live row; rows are compact (0..rows-1), in the engine's row order."""

    def __init__(self) -> None:
        self.keys: list[Any] = []  # per layer [rows, kv heads, capacity, dim]
        self.values: list[Any] = []
        self.lengths: Any = None  # [rows]: tokens already in the cache = the position of the next token
        self._bias: dict = {}
        # Set by `begin_step` for the step's attention calls (the same for every layer): the columns
        # it reads, the rows' indices, and their common length when every row has the same one.
        self.columns = 0
        self.row_index: Any = None
        self.same_length: int | None = None

    @property
    def rows(self) -> int:
        return 0 if self.lengths is None else int(self.lengths.shape[0])

    def add(self, keys: list[Any], values: list[Any], copies: int = 1) -> None:
        """Append `copies` rows holding one prefill's cache (per layer [1, kv heads, length, dim])."""
        import torch

        length = keys[0].shape[2]
        if not self.keys:
            self.keys = [k.new_zeros((0, k.shape[1], length, k.shape[3])) for k in keys]
            self.values = [v.new_zeros((0, v.shape[1], length, v.shape[3])) for v in values]
            self.lengths = torch.zeros(0, dtype=torch.long, device=keys[0].device)
        self.reserve(length)
        cap = self.keys[0].shape[2]
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            kk = k.new_zeros((copies, k.shape[1], cap, k.shape[3]))
            vv = v.new_zeros((copies, v.shape[1], cap, v.shape[3]))
            kk[:, :, :length] = k[0]
            vv[:, :, :length] = v[0]
            self.keys[i] = torch.cat([self.keys[i], kk])
            self.values[i] = torch.cat([self.values[i], vv])
        add = torch.full((copies,), length, dtype=torch.long, device=self.lengths.device)
        self.lengths = torch.cat([self.lengths, add])

    def keep(self, index: list[int]) -> None:
        """Keep only the rows at `index` (in that order)."""
        import torch

        idx = torch.tensor(index, dtype=torch.long, device=self.lengths.device)
        self.keys = [k.index_select(0, idx) for k in self.keys]
        self.values = [v.index_select(0, idx) for v in self.values]
        self.lengths = self.lengths.index_select(0, idx)
        if not index:
            self.keys, self.values, self.lengths = [], [], None

    def reserve(self, columns: int) -> None:
        """Room for `columns` tokens per row; grows in steps of 64 so most steps copy nothing."""
        import torch

        cap = self.keys[0].shape[2] if self.keys else 0
        if columns <= cap:
            return
        grow = max(columns - cap, 64)
        self.keys = [torch.cat([k, k.new_zeros((*k.shape[:2], grow, k.shape[3]))], dim=2) for k in self.keys]
        self.values = [torch.cat([v, v.new_zeros((*v.shape[:2], grow, v.shape[3]))], dim=2) for v in self.values]

    def begin_step(self) -> None:
        """Before a decode step: room for one more token per row, masks rebuilt for the new lengths."""
        import torch

        lengths = self.lengths.tolist()
        self.columns = max(lengths) + 1
        self.reserve(self.columns)
        self._bias.clear()
        self.same_length = lengths[0] if min(lengths) == self.columns - 1 else None
        if self.row_index is None or len(self.row_index) != len(lengths):
            self.row_index = torch.arange(len(lengths), device=self.lengths.device)

    def end_step(self) -> None:
        self.lengths = self.lengths + 1

    def bias(self, columns: int, window: int | None, dtype: Any) -> Any:
        """Additive mask [rows, 1, 1, columns]: a row sees its own columns up to the new token."""
        import torch

        key = (columns, window, dtype)
        if key not in self._bias:
            cols = torch.arange(columns, device=self.lengths.device)[None, :]
            visible = cols <= self.lengths[:, None]
            if window is not None:
                visible &= cols > (self.lengths - window)[:, None]
            self._bias[key] = additive_mask(visible, dtype)
        return self._bias[key]


def row_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    row_cache: RowCache | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """One new token per row: `query`/`key`/`value` [rows, heads, 1, dim] against the row's cache."""
    import torch

    from llamaduo.decode import SharedPrefixUnsupported

    if row_cache is None:
        # Not one of the batch's decode steps (a prefill, or `generate` on the same model): sdpa, whose
        # mask this implementation is registered with.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    if query.shape[2] != 1:
        raise SharedPrefixUnsupported("the row-cache attention only runs decode steps")
    for name in ("s_aux", "position_bias", "sinks"):
        if kwargs.get(name) is not None:
            raise SharedPrefixUnsupported(f"attention with {name} is not supported")
    st = row_cache
    layer = module.layer_idx
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    kc, vc = st.keys[layer], st.values[layer]
    if key.dtype != kc.dtype:
        key, value = key.to(kc.dtype), value.to(vc.dtype)
    columns, same = st.columns, st.same_length
    if same is not None:  # every row writes the same column: a plain slice, not a scatter
        kc[:, :, same] = key[:, :, 0]
        vc[:, :, same] = value[:, :, 0]
    else:
        kc[st.row_index, :, st.lengths] = key[:, :, 0]
        vc[st.row_index, :, st.lengths] = value[:, :, 0]
    k, v = kc[:, :, :columns], vc[:, :, :columns]
    scale = scaling if scaling is not None else dim**-0.5
    q = query.reshape(rows, kv_heads, groups, dim)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [rows, kv, groups, columns]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    # Rows of one length whose window (if any) reaches back to column 0 see every column: no mask.
    if same is None or (sliding_window is not None and same - sliding_window + 1 > 0):
        scores = scores + st.bias(columns, sliding_window, scores.dtype)
    probs = scores.softmax(dim=-1).to(query.dtype)
    out = torch.matmul(probs, v)  # [rows, kv, groups, dim]
    return out.reshape(rows, heads, 1, dim).transpose(1, 2), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, row_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def prefill(model: Any, ids: list[int], reuse: Any = None, **forward: Any) -> tuple[list[Any], list[Any], Any]:
    """Run one prompt through the model (its own attention): (keys, values per layer, last logits [vocab]).

    `reuse` (a `prefixcache.Reuse`): its first `tokens` prompt tokens' keys and values seed the cache
    and only the rest of the prompt runs; the whole prompt's results come back as without it."""
    import torch
    from transformers import DynamicCache

    from llamaduo.decode import SharedPrefixUnsupported

    if reuse is not None and reuse.whole:
        return reuse.entry.keys, reuse.entry.values, reuse.entry.last
    device = next(model.parameters()).device
    cache, start = DynamicCache(), 0
    if reuse is not None:
        start = reuse.tokens
        for i, (k, v) in enumerate(zip(reuse.entry.keys, reuse.entry.values, strict=True)):
            cache.update(k[:, :, :start], v[:, :, :start], i)  # the layer concatenates: the entry is not written
    input_ids = torch.tensor([ids[start:]], dtype=torch.long, device=device)
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1, **forward)
    layers = getattr(out.cache, "layers", None) or []
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise SharedPrefixUnsupported("the prefill did not leave a key/value cache per layer")
    if any(layer.keys.shape[2] != len(ids) for layer in layers):
        raise SharedPrefixUnsupported("the prefill's cache does not hold every prompt token (a sliding cache)")
    return [layer.keys for layer in layers], [layer.values for layer in layers], out.logits[0, -1]
