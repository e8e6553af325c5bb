"""Loading the local model: Hub id, local directory or GGUF file; one chat template for train and infer.

`encode_prompt` is the single place a conversation becomes prompt token ids; training
(`train.tokenize_example`) and inference (`infer.generate`) both call it, so the prefix a
model is trained on is exactly the prefix it is prompted with.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from llamaduo.config import ModelConfig
from llamaduo.errors import UserError
from llamaduo.store import hash_dir

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL = ["<|im_start|>", "<|im_end|>"]

# A few kilobytes of varied text for the tiny test tokenizer: words, digits, punctuation, JSON.
_TINY_CORPUS = """
The quick brown fox jumps over the lazy dog. Please summarize the following text in one sentence.
Extract the request in this customer message as JSON with the keys intent, name, city, item and quantity.
{"intent": "order", "name": "Maria Lopez", "city": "Lyon", "item": "blue mug", "quantity": 3}
{"intent": "cancel", "name": "Tom Berg", "city": "Porto", "item": "desk lamp", "quantity": 1}
{"intent": "return", "name": "Aisha Khan", "city": "Leeds", "item": "notebook", "quantity": 12}
Hi, I'm Lukas from Graz. Please send me two water bottles. Hello! Could you ship 5 phone cases?
Classify the sentiment of this review as positive, negative or neutral. The answer is 42.
What is the capital of France? Paris is the capital of France. Write a short poem about the sea.
Question: how many days are in a week? Answer: seven days. Rewrite this sentence politely.
def add(a, b):\n    return a + b\nprint(add(1, 2))  # 3
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024. Dates: 12 March, 3 May, 21 June.
I would like to order a coffee grinder and a yoga mat. Cancel my backpack, I no longer need it.
The tea kettle arrived damaged; I want to return it. Thanks, Sofia. Good morning, this is Omar.
"""


# ------------------------------------------------------------------ tiny test model
def build_tiny_model(out_dir: Path, seed: int = 0, vocab_size: int = 600) -> Path:
    """A 2-layer Llama (hidden 64) and a BPE tokenizer trained offline; saved like a real model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", *CHATML_SPECIAL]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token=None, padding_side="left"
    )
    fast.add_special_tokens({"additional_special_tokens": CHATML_SPECIAL})
    fast.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = fast.pad_token_id
    model.generation_config.eos_token_id = fast.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------- chat template
def ensure_chat_template(tokenizer: Any, template: str | None = None) -> bool:
    """Give the tokenizer the one chat template used everywhere. Returns True if tokens were added.

    Precedence: the user's template (text or a file path), the model's own, else ChatML with
    its special tokens (base models such as Gemma 3 270M pretrained ship none).
    """
    added = False
    if template:
        p = Path(template)
        tokenizer.chat_template = p.read_text(encoding="utf-8") if len(template) < 1024 and p.is_file() else template
    elif not getattr(tokenizer, "chat_template", None):
        missing = [t for t in CHATML_SPECIAL if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
            added = True
        tokenizer.chat_template = CHATML_TEMPLATE
    if "<|im_end|>" in (tokenizer.chat_template or "") and tokenizer.eos_token != "<|im_end|>":
        tokenizer.eos_token = "<|im_end|>"  # generation must stop at the end of the turn
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        if "<|pad|>" in tokenizer.get_vocab() or tokenizer.unk_token is None:
            if "<|pad|>" not in tokenizer.get_vocab():
                tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
                added = True
            tokenizer.pad_token = "<|pad|>"
        else:
            tokenizer.pad_token = tokenizer.unk_token
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
        return base if base.exists() else cfg.base
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
        tok = AutoTokenizer.from_pretrained(str(src))
    except OSError as e:
        raise UserError(f"model.base: cannot load tokenizer from {src}: {str(e).splitlines()[0]}") from None
    added = ensure_chat_template(tok, cfg.chat_template)
    return tok, added


def added_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Ids of the template tokens this library added to a base vocabulary (trained with LoRA)."""
    original = getattr(model.config, "llamaduo_base_vocab", None)
    return list(range(original, len(tokenizer))) if original else []


def load_model(cfg: ModelConfig, adapter: Path | None = None, for_training: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) with the chat template in place and an optional PEFT adapter attached."""
    from transformers import AutoModelForCausalLM

    base = resolve_base(cfg)
    # A saved adapter directory carries the tokenizer it was trained with (added tokens included).
    tok_src = adapter if adapter is not None and (Path(adapter) / "tokenizer_config.json").exists() else base
    tok, _ = load_tokenizer(cfg, tok_src)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=resolve_dtype(cfg.dtype))
    except OSError as e:
        raise UserError(f"model.base: cannot load {base}: {str(e).splitlines()[0]}") from None
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        import torch

        # New rows (ChatML tokens for a base model) must be identical in every process that
        # loads this model, or an adapter trained in one would not fit the base in another.
        torch.manual_seed(0)
        model.config.llamaduo_base_vocab = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if adapter is not None:
        from peft import PeftModel

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
