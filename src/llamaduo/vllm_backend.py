"""The infer stage on vLLM (GPUs): the round's LoRA adapter, guided decoding for structured tasks,
and vLLM's parallel settings (`infer.vllm`).

- **Tensor / pipeline parallel**: one vLLM engine over `tensor_parallel_size × pipeline_parallel_size`
  GPUs (a model too large for one GPU).
- **Data parallel**: `data_parallel_size` engines, each on its own group of GPUs in its own
  process (`CUDA_VISIBLE_DEVICES` set before vLLM starts), each answering a contiguous shard of
  the test prompts; the shards' completions are put back in prompt order. Every request carries
  the run's seed (`SamplingParams.seed`, a per-request generator), so its samples do not depend
  on the shard it fell in.

Structured prompts decode under the same grammar as the transformers route (`structure.spec`):
a response schema as vLLM's JSON guided decoding, tool calls as the xgrammar structural tag
`grammar.structural_tag` builds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaduo.artifacts import Completion
from llamaduo.config import Config, VLLMConfig
from llamaduo.data import Example
from llamaduo.errors import UserError


def vllm_available() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def guided(spec: Any) -> dict[str, Any]:
    """vLLM's guided decoding for a `GrammarSpec` (None: free text)."""
    if spec is None:
        return {}
    from vllm.sampling_params import StructuredOutputsParams

    if not spec.tools:
        return {"structured_outputs": StructuredOutputsParams(json=json.loads(spec.schema), disable_any_whitespace=True)}
    from llamaduo.grammar import structural_tag

    return {"structured_outputs": StructuredOutputsParams(structural_tag=structural_tag(spec).model_dump_json())}


def engine_kwargs(v: VLLMConfig, model: str, is_lora: bool, lora_rank: int | None, seed: int) -> dict[str, Any]:
    """The `vllm.LLM(...)` arguments of one engine (one data-parallel shard)."""
    kw: dict[str, Any] = {
        "model": model, "seed": seed, "enable_lora": is_lora,
        "tensor_parallel_size": v.tensor_parallel_size, "pipeline_parallel_size": v.pipeline_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization, "enforce_eager": v.enforce_eager,
    }
    if v.max_model_len is not None:
        kw["max_model_len"] = v.max_model_len
    if is_lora and lora_rank is not None:
        kw["max_lora_rank"] = max(lora_rank, 8)  # vLLM refuses an adapter above its max rank (default 16)
    if v.distributed_executor_backend is not None:
        kw["distributed_executor_backend"] = v.distributed_executor_backend
    return kw


def device_groups(v: VLLMConfig, visible: list[str]) -> list[str]:
    """`CUDA_VISIBLE_DEVICES` of each data-parallel engine: consecutive groups of the visible GPUs."""
    per = v.tensor_parallel_size * v.pipeline_parallel_size
    need = per * v.data_parallel_size
    if need > len(visible):
        raise UserError(
            f"infer.vllm asks for {need} GPUs (data_parallel_size {v.data_parallel_size} × tensor_parallel_size "
            f"{v.tensor_parallel_size} × pipeline_parallel_size {v.pipeline_parallel_size}); {len(visible)} are visible"
        )
    return [",".join(visible[i * per:(i + 1) * per]) for i in range(v.data_parallel_size)]


def shards(n: int, parts: int) -> list[range]:
    """Contiguous, near-equal index ranges (the prompts are length-mixed already; vLLM batches inside)."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(range(start, end))
        start = end
    return out


def run_sharded(
    test: list[Example], groups: list[str], answer: Callable[[list[Example], str], list[Completion]]
) -> list[Completion]:
    """Each shard of `test` answered on its GPU group by `answer`; completions in prompt order."""
    parts = [(test[r.start:r.stop], g) for r, g in zip(shards(len(test), len(groups)), groups, strict=True) if len(r)]
    if len(parts) == 1:
        return answer(*parts[0])
    import concurrent.futures as cf
    import multiprocessing

    # spawn: each engine starts CUDA fresh in its own process, on its own devices
    with cf.ProcessPoolExecutor(len(parts), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(answer, *zip(*parts, strict=True)))
    return [c for part in results for c in part]


def generate_vllm(
    cfg: Config, test: list[Example], adapter_dir: Path | None, model_hash: str, adapter_hash: str
) -> list[Completion]:
    """The GPU route over `infer.vllm`'s parallel layout."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        visible = ",".join(str(i) for i in range(torch.cuda.device_count()))
    groups = device_groups(cfg.infer.vllm, [d for d in visible.split(",") if d.strip()])
    job = _Shard(cfg.model_dump(mode="json"), str(adapter_dir) if adapter_dir else None, model_hash, adapter_hash)
    return run_sharded(test, groups, job)


class _Shard:
    """One engine's work, picklable for a spawned process."""

    def __init__(self, cfg: dict[str, Any], adapter_dir: str | None, model_hash: str, adapter_hash: str):
        self.cfg, self.adapter_dir, self.model_hash, self.adapter_hash = cfg, adapter_dir, model_hash, adapter_hash

    def __call__(self, test: list[Example], devices: str) -> list[Completion]:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices  # before vLLM (and CUDA) start in this process
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        from llamaduo import models, structure
        from llamaduo.config import from_dict

        cfg = from_dict(self.cfg)
        adapter_dir = Path(self.adapter_dir) if self.adapter_dir else None
        own_tok = adapter_dir is not None and (adapter_dir / "tokenizer_config.json").exists()
        tok, _ = models.load_tokenizer(cfg.model, adapter_dir if own_tok else None)
        is_lora = adapter_dir is not None and (adapter_dir / "adapter_config.json").exists()
        rank = json.loads((adapter_dir / "adapter_config.json").read_text()).get("r") if is_lora else None
        model = str(adapter_dir if adapter_dir and not is_lora else models.resolve_base(cfg.model))
        llm = LLM(**engine_kwargs(cfg.infer.vllm, model, is_lora, rank, cfg.seed))
        s = cfg.infer
        params = [
            SamplingParams(n=s.num_samples, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                           stop=s.stop or None, seed=cfg.seed, **guided(structure.spec(e)))
            for e in test
        ]
        prompts = [structure.prompt_for(tok, e) for e in test]
        texts = [p if isinstance(p, str) else models.render_prompt(tok, p) for p in prompts]
        lora = LoRARequest("round", 1, str(adapter_dir)) if is_lora else None
        outs = llm.generate(texts, params, lora_request=lora)
        return [
            Completion(prompt_id=e.id, sample_index=j, text=o.text.strip(), model_hash=self.model_hash,
                       adapter_hash=self.adapter_hash, finish_reason=o.finish_reason or "stop",
                       new_tokens=len(o.token_ids))
            for e, out in zip(test, outs, strict=True)
            for j, o in enumerate(out.outputs)
        ]
