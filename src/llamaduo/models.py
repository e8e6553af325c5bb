"""Loading the local model: Hub id, local directory or GGUF file; one chat template for train and infer.

`encode_prompt` is the single place a conversation becomes prompt token ids; training
(`train.tokenize_example`) and inference (`infer.generate`) both call it, so the prefix a
model is trained on is exactly the prefix it is prompted with.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path
from typing import Any

from llamaduo.config import ModelConfig
from llamaduo.errors import UserError
from llamaduo.hashing import hash_dir

CHATML_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma's turn format, for base checkpoints that carry its turn tokens but no template: the
# tokens are already trained, so nothing is added to the vocabulary. System text opens the
# first user turn, as Gemma has no system role.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CHATML_SPECIAL = ["<|im_start|>", "<|im_end|>"]
GEMMA_SPECIAL = ["<start_of_turn>", "<end_of_turn>"]


# ----------------------------------------------------------------- chat template
def ensure_chat_template(tokenizer: Any, template: str | None = None) -> bool:
    """Give the tokenizer the one chat template used everywhere. Returns True if tokens were added
    (the model's embeddings must then be resized, as `load_model` does).

    Precedence: the user's template (text or a file path), the model's own, Gemma's turn format
    when the vocabulary has its turn tokens, else ChatML with its special tokens added (base
    models ship no template). eos becomes the end-of-turn token so generation stops there;
    pad is kept distinct from eos where the vocabulary allows; padding is on the left.
    """
    added = False
    base_eos = tokenizer.eos_token
    vocab = tokenizer.get_vocab()
    if template:
        p = Path(template)
        tokenizer.chat_template = p.read_text(encoding="utf-8") if len(template) < 1024 and p.is_file() else template
    elif not getattr(tokenizer, "chat_template", None):
        if all(t in vocab for t in GEMMA_SPECIAL):
            tokenizer.chat_template = GEMMA_TEMPLATE
        else:
            missing = [t for t in CHATML_SPECIAL if t not in vocab]
            if missing:
                tokenizer.add_special_tokens({"additional_special_tokens": missing})
                added = True
            tokenizer.chat_template = CHATML_TEMPLATE
    vocab = tokenizer.get_vocab()
    for end in ("<|im_end|>", "<end_of_turn>"):
        if end in tokenizer.chat_template and end in vocab:
            tokenizer.eos_token = end  # generation must stop at the end of the turn
            break
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif "<|pad|>" in vocab:
            tokenizer.pad_token = "<|pad|>"
        elif base_eos is not None and base_eos != tokenizer.eos_token:
            tokenizer.pad_token = base_eos  # the pretraining eos is free once turns end with their own token
        else:
            tokenizer.pad_token = tokenizer.eos_token  # masked everywhere; generation cuts at the first eos
    tokenizer.padding_side = "left"
    return added


def _as_dicts(messages: list[Any]) -> list[dict[str, str]]:
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]


def render_prompt(tokenizer: Any, messages: list[Any]) -> str:
    """The prompt text (with the assistant generation prefix) for a conversation."""
    return tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, messages: list[Any]) -> list[int]:
    """Prompt token ids. Special tokens come from the template only, never added twice."""
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def completion_text(tokenizer: Any, messages: list[Any]) -> str:
    """What the model must produce after the prompt: the target turn as the template renders it."""
    msgs = _as_dicts(messages)
    prompt = render_prompt(tokenizer, msgs[:-1])
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if full.startswith(prompt):
        return full[len(prompt):]
    return msgs[-1]["content"] + (tokenizer.eos_token or "")


# --------------------------------------------------------------------- loading
def resolve_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def bf16_native() -> bool:
    """Whether this machine computes bf16 natively (else bf16 is emulated and slow)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # AVX512-BF16 or AMX
    except (AttributeError, RuntimeError):
        return False


def _gguf_cache(cfg: ModelConfig, gguf_path: Path) -> Path:
    h = hashlib.sha256(f"{gguf_path.resolve()}:{gguf_path.stat().st_size}:{gguf_path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(cfg.cache_dir) if cfg.cache_dir else Path.home() / ".cache" / "llamaduo" / "gguf"
    return root / f"{gguf_path.stem}-{h}"


def resolve_base(cfg: ModelConfig) -> Path | str:
    """A directory transformers can load fast. A GGUF file is converted once to safetensors and cached."""
    if not cfg.base:
        raise UserError("model.base is not set: a local model directory, a .gguf file or a Hub id")
    base = Path(cfg.base)
    gguf: Path | None = None
    if base.is_file() and base.suffix == ".gguf":
        gguf = base
    elif base.is_dir() and cfg.gguf_file:
        gguf = base / cfg.gguf_file
    if gguf is None:
        if base.exists():
            return base
        if cfg.base.startswith(("/", ".", "~")) or cfg.base.count("/") > 1 or base.suffix == ".gguf":
            raise UserError(f"model.base: {cfg.base}: no such directory or file")
        return cfg.base  # a Hub id, served from the local cache
    if not gguf.exists():
        raise UserError(f"model.gguf_file: {gguf}: no such file")
    cached = _gguf_cache(cfg, gguf)
    if (cached / "config.json").exists():
        return cached
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Dequantising a GGUF takes about a minute on a laptop CPU; do it once.
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # The weights are already dequantised to float32; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(cached)
    return cached


def load_tokenizer(cfg: ModelConfig, path: Path | str | None = None) -> tuple[Any, bool]:
    from transformers import AutoTokenizer

    src = path or resolve_base(cfg)
    try:
        # Hub ids come from the local cache only: a run never downloads behind the user's back.
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except OSError as e:
        if not Path(str(src)).exists():
            raise UserError(
                f"model.base: {src}: not a local model and not in the Hugging Face cache "
                f"(runs are offline; fetch it first: huggingface-cli download {src})"
            ) from None
        raise UserError(f"model.base: cannot load tokenizer from {src}: {str(e).splitlines()[0]}") from None
    tok = _declared_class(tok, src)
    added = ensure_chat_template(tok, cfg.chat_template)
    return tok, added


def _declared_class(tok: Any, src: Path | str) -> Any:
    """The tokenizer as the class its tokenizer_config.json names. transformers 5 picks a Qwen2
    model's tokenizer class from its model type (byte-level BPE) over the one the checkpoint
    declares, so a checkpoint with another vocabulary (a SentencePiece one, as llama.cpp reads it)
    would split text unlike the way it was saved."""
    import json

    import transformers

    conf = Path(str(src)) / "tokenizer_config.json"
    try:
        declared = json.loads(conf.read_text(encoding="utf-8")).get("tokenizer_class") if conf.is_file() else None
    except (OSError, ValueError):
        return tok
    if not isinstance(declared, str):
        return tok
    cls = getattr(transformers, declared, None) or getattr(transformers, declared.removesuffix("Fast"), None)
    if not isinstance(cls, type) or isinstance(tok, cls) or not hasattr(cls, "from_pretrained"):
        return tok
    return cls.from_pretrained(str(src), local_files_only=True)


def load_model(
    cfg: ModelConfig, adapter: Path | None = None, for_training: bool = False, quantize_4bit: bool = False
) -> tuple[Any, Any]:
    """(model, tokenizer) with the chat template in place and an optional PEFT adapter attached.

    `quantize_4bit` loads the base as NF4 with bitsandbytes on this process's GPU (QLoRA).
    """
    from transformers import AutoModelForCausalLM

    base = resolve_base(cfg)
    # A saved adapter directory carries the tokenizer it was trained with (added tokens included).
    tok_src = adapter if adapter is not None and (Path(adapter) / "tokenizer_config.json").exists() else base
    tok, _ = load_tokenizer(cfg, tok_src)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(cfg.dtype), "local_files_only": True}
    if quantize_4bit:
        import os

        import torch
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        # A quantized model cannot be moved after loading: place it on this rank's GPU now.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    except OSError as e:
        raise UserError(f"model.base: cannot load {base}: {str(e).splitlines()[0]}") from None
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        import torch

        # New rows (ChatML tokens for a base model) must be identical in every process that
        # loads this model, or an adapter trained in one would not fit the base in another.
        # Mean-initialised rows start as an "average token"; they stay frozen under LoRA (the
        # adapter learns to read and emit them), so adapters stay small.
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the resize explains its init method at length
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model.config.llamaduo_base_vocab = model.get_input_embeddings().weight.shape[0]
                model.resize_token_embeddings(len(tok), mean_resizing=True)
        finally:
            hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    # Stop at the end of the turn, and still at any end token the model was pretrained with.
    own = model.generation_config.eos_token_id
    own = own if isinstance(own, list) else [own] if own is not None else []
    model.generation_config.eos_token_id = [tok.eos_token_id, *(i for i in own if i != tok.eos_token_id)]
    if adapter is not None:
        from peft import PeftModel

        with warnings.catch_warnings():
            # PEFT still asks the model a question transformers 5 renamed; nothing for the user to do.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=for_training)
    if not for_training:
        model.eval()
    return model, tok


def merge_adapter(model: Any) -> Any:
    """Fold a PEFT adapter into the base weights (a plain transformers model comes back)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def model_hash(cfg: ModelConfig) -> str:
    base = Path(cfg.base)
    if base.is_dir():
        return hash_dir(base)
    if base.is_file():
        st = base.stat()
        return hashlib.sha256(f"{base.name}:{st.st_size}".encode()).hexdigest()[:16]
    return hashlib.sha256(cfg.base.encode()).hexdigest()[:16]


def adapter_hash(adapter_dir: Path | None) -> str:
    return hash_dir(adapter_dir) if adapter_dir is not None and Path(adapter_dir).exists() else ""
