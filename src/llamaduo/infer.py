"""Batch inference on the test split: K samples per prompt, length-sorted left-padded batches.

The transformers backend runs anywhere, decoding with `decode.decode` (the K samples of a prompt
share one prefill and read its cache once; architectures that loop does not fit use `generate`);
the vLLM backend (LoRA included) is used when vLLM is installed and CUDA is present. Prompts are
encoded by `models.encode_prompt`, the function training uses, so the model sees at inference
exactly the prefix it was trained on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any

from llamaduo.artifacts import Completion
from llamaduo.config import Config, InferConfig
from llamaduo.constraint import ConstraintFactory
from llamaduo.data import Example, Message
from llamaduo.errors import UserError
from llamaduo.reporting import ProgressReporter

log = logging.getLogger("llamaduo.infer")


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end a turn: the tokenizer's eos, the model's own, and `<|im_end|>` if known."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    if im_end is not None and im_end not in ids:
        ids.append(im_end)
    return ids


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[tuple[str, list[Message]]],
    sampling: InferConfig,
    seed: int = 0,
    model_hash: str = "",
    adapter_hash: str = "",
    progress: ProgressReporter | None = None,
    constraints: list[ConstraintFactory | None] | None = None,
) -> list[Completion]:
    """Generate `sampling.num_samples` completions per prompt; output in input order × sample index.

    A prompt is its messages, or its rendered text (a conversation with tools, see `tools.py`).
    `constraints` gives each prompt a constraint factory (or None): every sample of that prompt
    decodes under a fresh constraint from it (grammar-constrained decoding, `grammar.py`)."""
    import torch

    k = sampling.num_samples
    encoded = [(pid, prompt_ids(tokenizer, msgs)) for pid, msgs in prompts]
    # Length-sorted batches waste little on padding; the original order is restored at the end.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][1]))
    results: dict[int, list[Completion]] = {}
    greedy = sampling.temperature == 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    # Sampling reseeds per batch; the caller's RNG state is left as it was.
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    if progress is not None:
        progress.start(len(order))
    with contextlib.ExitStack() as stack, torch.inference_mode(), torch.random.fork_rng(devices=rng_devices):
        if progress is not None:
            stack.callback(progress.stop)
        start = 0
        for idx in batches([len(encoded[i][1]) for i in order], sampling):
            idx = [order[j] for j in idx]
            longest = max(len(encoded[i][1]) for i in idx)
            input_ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
            attn = torch.zeros((len(idx), longest), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i][1]
                input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attn[row, longest - len(ids):] = 1
            # Seeded per batch position so a rerun (or a resumed run) samples the same text.
            torch.manual_seed(seed * 1_000_003 + start)
            per = 1 if greedy else k
            rows = None
            if constraints is not None and any(constraints[i] is not None for i in idx):
                rows = [constraints[i]() if constraints[i] is not None else None for i in idx for _ in range(per)]
            gen = _generate_batch(model, tokenizer, input_ids.to(device), attn.to(device), sampling, eos_ids, pad_id,
                                  rows)
            for row, i in enumerate(idx):
                comps = []
                for s in range(k):
                    seq = gen[row * per + (0 if greedy else s)].tolist()
                    n_new = len(seq)
                    finish = "length"
                    ends = [j for j, t in enumerate(seq) if t in eos_ids]
                    if ends:
                        n_new, finish = ends[0], "stop"
                    while n_new and seq[n_new - 1] == pad_id:
                        n_new -= 1
                    text = tokenizer.decode(seq[:n_new], skip_special_tokens=True)
                    text, stopped = _cut_at_stop(text, sampling.stop)
                    comps.append(
                        Completion(
                            prompt_id=encoded[i][0], sample_index=s, text=text.strip(), model_hash=model_hash,
                            adapter_hash=adapter_hash, finish_reason="stop" if stopped else finish, new_tokens=n_new,
                        )
                    )
                results[i] = comps
            if progress is not None:
                progress.advance(len(idx))
            start += len(idx)
    return [c for i in range(len(encoded)) for c in results[i]]


def prompt_ids(tokenizer: Any, prompt: list[Message] | str) -> list[int]:
    """A prompt's token ids: messages through the chat template, or text the template rendered."""
    from llamaduo.models import encode_prompt

    if isinstance(prompt, str):  # already rendered by its chat template: special tokens are in the text
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return encode_prompt(tokenizer, prompt)


def batches(sorted_lengths: list[int], sampling: InferConfig) -> list[list[int]]:
    """Consecutive index groups of length-sorted prompts: at most `batch_size` prompts each, and
    within `batch_tokens` (counting the padded prompts and every sample's new tokens) if set."""
    k = 1 if sampling.temperature == 0 else sampling.num_samples
    out: list[list[int]] = []
    cur: list[int] = []
    for i, length in enumerate(sorted_lengths):
        n = len(cur) + 1
        cost = n * length + n * k * sampling.max_new_tokens
        full = len(cur) >= sampling.batch_size or (sampling.batch_tokens is not None and cost > sampling.batch_tokens)
        if cur and full:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


def _generate_batch(
    model: Any, tokenizer: Any, input_ids: Any, attention_mask: Any, sampling: InferConfig, eos_ids: list[int], pad_id: int,
    constraints: list[Any] | None = None,
) -> Any:
    """New tokens of one left-padded batch: [prompts * K, max_new_tokens] (one row per prompt if greedy)."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    from llamaduo.decode import SharedPrefixUnsupported, decode
    from llamaduo.sampling import greedy as greedy_pick

    greedy = sampling.temperature == 0
    copies = 1 if greedy else sampling.num_samples
    top_k = getattr(model.generation_config, "top_k", None)
    stops = StoppingCriteriaList([StopStringCriteria(tokenizer, sampling.stop)] if sampling.stop else [])
    if not getattr(model, "_llamaduo_plain_generate", False):
        try:
            return decode(
                model, input_ids, attention_mask, copies, sampling.max_new_tokens,
                pick=greedy_pick if greedy else (
                    lambda logits: draw(logits, sampling.temperature, sampling.top_p, top_k)
                ),
                eos_ids=eos_ids, pad_id=pad_id, stop=(lambda gen: stops(gen, None)) if stops else None,
                constraints=constraints,
            ).cpu()
        except SharedPrefixUnsupported as e:
            log.warning("%s: decoding with plain `generate` (%s)", type(model).__name__, e)
            model._llamaduo_plain_generate = True  # this architecture decodes with plain `generate` from now on
    kwargs: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens, "pad_token_id": pad_id, "eos_token_id": eos_ids,
        "num_return_sequences": copies, "do_sample": False, "stopping_criteria": stops,
    }
    processors: list[Any] = [] if constraints is None else [_Constrained(constraints, input_ids.shape[1])]
    if not greedy:
        # Sampled here, picked by `generate`'s argmax: see `draw`.
        processors.append(lambda ids, scores: _only(scores, draw(scores, sampling.temperature, sampling.top_p, top_k)))
    if processors:
        kwargs["logits_processor"] = processors
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out[:, input_ids.shape[1]:].cpu()


class _Constrained:
    """Per-row constraints as a `generate` logits processor: feed each row its last token, then mask."""

    def __init__(self, constraints: list[Any], prompt_width: int):
        self.constraints, self.width = constraints, prompt_width

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        last = input_ids[:, -1].tolist() if input_ids.shape[1] > self.width else None
        for i, c in enumerate(self.constraints):
            if c is None or c.is_finished():
                continue
            if last is not None:
                c.accept(last[i])
                if c.is_finished():
                    continue
            c.mask_logits(scores[i])
        return scores


def _only(scores: Any, tokens: Any) -> Any:
    """Scores that leave only `tokens` standing, for `generate`'s greedy step to emit."""
    import torch

    return torch.full_like(scores, float("-inf")).scatter_(-1, tokens[:, None], 0.0)


def draw(logits: Any, temperature: float, top_p: float, top_k: int | None) -> Any:
    """Next token ids [rows] drawn from logits [rows, vocab] at `temperature`, top-k, then top-p.

    `generate`'s own sampling ends in `torch.multinomial` over the whole vocabulary, which on a
    CPU costs ~0.2 s a step for 32 rows of Gemma's 262k words, more than the model itself. Here
    the draw is over the top-k candidates (the model's `top_k`, as `generate` would use), or by
    inverse CDF over the full distribution when there is no top-k. Uses torch's global RNG.
    """
    import torch

    logits = logits.float() / temperature
    if top_k:
        values, index = logits.topk(min(int(top_k), logits.shape[-1]), dim=-1)
    elif top_p < 1:
        values, index = logits.sort(dim=-1, descending=True)
    else:
        values, index = logits, None
    probs = values.softmax(dim=-1)
    if top_p < 1:
        # Keep the smallest head of the (sorted) distribution whose mass reaches top_p.
        probs = probs * ((probs.cumsum(dim=-1) - probs) < top_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]  # scaled: rounding never picks a zero
    pick = (cdf < u).sum(dim=-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
    return (pick if index is None else index.gather(-1, pick)).squeeze(-1)


def run_inference(
    cfg: Config, test: list[Example], adapter_dir: Path | None, progress: ProgressReporter | None = None
) -> list[Completion]:
    """Load the round's model and answer every test prompt K times."""
    from llamaduo import models

    mh, ah = models.model_hash(cfg.model), models.adapter_hash(adapter_dir)
    from llamaduo.vllm_backend import generate_vllm, vllm_available

    if cfg.infer.backend == "vllm" and not vllm_available():
        raise UserError("infer.backend=vllm needs the vllm package and a CUDA GPU; use infer.backend=transformers")
    if cfg.infer.backend == "vllm" or (cfg.infer.backend == "auto" and vllm_available()):
        if cfg.infer.precision == "int8":
            raise UserError("infer.precision=int8 is int8 weights for CPU generation on transformers, and vLLM is "
                            "installed (infer.backend auto picks it): set infer.backend to transformers")
        return generate_vllm(cfg, test, adapter_dir, mh, ah)
    if cfg.infer.vllm != type(cfg.infer.vllm)():  # backend auto without vLLM here: the layout is not used
        log.warning("infer.vllm is set, but vLLM with CUDA is not available here: answering on transformers, "
                    "one process")
    model, tok = round_model(cfg, adapter_dir)
    prompts, constraints = structured_prompts(tok, test, stop_token_ids(model, tok), cfg.infer.max_new_tokens)
    return generate(model, tok, prompts, cfg.infer, seed=cfg.seed, model_hash=mh, adapter_hash=ah, progress=progress,
                    constraints=constraints)


def structured_prompts(
    tokenizer: Any, test: list[Example], stop_ids: list[int], max_tokens: int
) -> tuple[list[tuple[str, Any]], list[ConstraintFactory | None] | None]:
    """Each test prompt as the model sees it, and the grammar its answer decodes under — the
    prompt and the constraint `serve` applies to the same request (`structure.py`)."""
    from llamaduo import structure

    prompts = [(e.id, structure.prompt_for(tokenizer, e)) for e in test]
    specs = [structure.spec(e) for e in test]
    if not any(specs):
        return prompts, None
    from llamaduo.grammar import Grammars

    grammars = Grammars(tokenizer, stop_ids)
    return prompts, [grammars.factory(s, max_tokens) if s is not None else None for s in specs]


# Below this size a decoding step is bound by per-step overhead and the KV cache, not by reading
# weights, and bf16's conversions cost more than they save (measured on the tiny test model).
BF16_MIN_PARAMS = 50_000_000


def serving_threads(model: Any, small: int = BF16_MIN_PARAMS) -> int:
    """Set and return the torch threads a served model decodes on (process-wide: the decode thread,
    started later, takes torch's setting; call it where the process serves this model only).

    One for a model under `small` parameters: its ops are too small to split, and on a shared CPU a
    second spinning thread makes each one many times slower (measured: a LoRA-sized linear took
    ~1-6 ms on 2 threads under load vs ~30 µs on one). Every core otherwise, int8 linears included
    (Gemma 3 270M served in int8, 2 cores, one client: 21.5 vs 14.8 tok/s on one thread), once the
    loading thread's OpenMP pool is released (`release_thread_pool`): left in place, it had made the
    decode thread's two threads no faster than one."""
    import torch

    from llamaduo.quantize import int8_weights

    tiny = sum(p.numel() for p in model.parameters()) + int8_weights(model) < small
    n = 1 if tiny else _torch_default_threads()
    torch.set_num_threads(n)
    return n


def release_thread_pool() -> bool:
    """Free the OpenMP worker pool torch keeps for the calling thread (False: no libgomp found).

    Why: libgomp gives every thread that ran a parallel op its own pool, and once pooled threads
    outnumber the cores it stops spinning between ops; the server's decode thread then waits on a
    wake-up in every op (a small int8 matmul, 2 threads: 113 vs 45 µs). Call it in the thread that
    loaded the model, before the decode thread's first op."""
    import ctypes
    import glob
    import os

    import torch

    for path in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")):
        with contextlib.suppress(OSError, AttributeError):
            return ctypes.CDLL(path).omp_pause_resource_all(1) == 0  # omp_pause_soft
    return False


@functools.cache
def _torch_default_threads() -> int:
    """torch's own thread count (its cores), read before `serving_threads` first changes it."""
    import torch

    return torch.get_num_threads()


def for_generation(model: Any, infer_cfg: InferConfig) -> Any:
    """The model in the precision generation runs in (see `InferConfig.precision`): 'auto' casts
    fp32 weights to bf16 (in place) for sampling where the hardware computes bf16 natively and the
    model is large enough; greedy decoding stays in fp32."""
    import torch

    from llamaduo.models import bf16_native

    dtype = next(model.parameters()).dtype
    if infer_cfg.precision == "int8":
        from llamaduo.quantize import int8_linears

        return int8_linears(model, infer_cfg.int4_lm_head)
    if infer_cfg.precision == "bf16":
        return model.to(torch.bfloat16)
    if infer_cfg.precision == "fp32":
        return model.to(torch.float32)
    if infer_cfg.temperature == 0:
        # Greedy is asked for to be reproducible: bf16 rounds differently with the batch's shape,
        # which can flip near-ties, so greedy answers stay in fp32 (identical for any batch size).
        return model
    big = sum(p.numel() for p in model.parameters()) >= BF16_MIN_PARAMS
    return model.to(torch.bfloat16) if dtype == torch.float32 and big and bf16_native() else model


def round_model(cfg: Config, adapter_dir: Path | None) -> tuple[Any, Any]:
    """The round's model as the infer stage generates with it. In int8 its LoRA adapter is merged
    first, as `deploy` merges it: a run is served from that merged export, so the quantized weights
    judged are the ones served (the adapter kept apart gave the same score on the demo, at half the
    speed)."""
    from llamaduo.models import merge_adapter

    model, tok = load_round_model(cfg, adapter_dir)
    if cfg.infer.precision == "int8":
        model = merge_adapter(model)
    return for_generation(model, cfg.infer), tok


def load_round_model(cfg: Config, adapter_dir: Path | None) -> tuple[Any, Any]:
    """A round's output is a LoRA adapter, or a whole model after full fine-tuning."""
    from llamaduo import models

    if adapter_dir is not None and (Path(adapter_dir) / "adapter_config.json").exists():
        return models.load_model(cfg.model, adapter=Path(adapter_dir))
    if adapter_dir is not None and (Path(adapter_dir) / "config.json").exists():
        full = cfg.model.model_copy(update={"base": str(adapter_dir), "gguf_file": None})
        return models.load_model(full)
    return models.load_model(cfg.model)
