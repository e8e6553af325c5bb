"""A tiny model built in-process for `llamaduo demo --quick` and the test suite.

`build_tiny_model` trains a byte-level BPE tokenizer on a few kilobytes of text and saves a
random 2-layer Llama beside it, laid out like a real checkpoint, so every stage that loads a
model (train, infer, deploy, serve) runs in seconds offline. It is no production model, so it
lives with the demo rather than in `models.py`; it shares that module's ChatML template so a
chat-style tiny model is templated exactly as `models.ensure_chat_template` would template it.
"""

from __future__ import annotations

from pathlib import Path

from llamaduo.models import CHATML_SPECIAL, CHATML_TEMPLATE

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
system: You are a helpful assistant. user: Hello there! assistant: Hi, how can I help you today?
The user asks a question and the assistant answers it briefly, clearly and politely.
[1, 2, 3] (a, b) <tag> x = y * 2 - 1; 50% off! "quoted" 'single' a/b a|b a_b #5 @home ~ok
"""


def build_tiny_model(
    out_dir: Path, seed: int = 0, vocab_size: int = 600, chat: bool = True, tied: bool = False, corpus: str = ""
) -> Path:
    """A 2-layer Llama (hidden 64) and a BPE tokenizer trained offline; saved like a real model.

    `chat=False` builds a base model as pretrained checkpoints ship: no ChatML tokens, no chat
    template, eos `<|endoftext|>` and no pad token. `tied=True` shares input and output embeddings.
    `corpus` is more tokenizer text (a task's fixed prompt text becomes a few tokens, not hundreds).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", *CHATML_SPECIAL] if chat else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS + corpus] * 4, trainer=trainer)
    if chat:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token=None, padding_side="left"
        )
        fast.add_special_tokens({"additional_special_tokens": CHATML_SPECIAL})
        fast.chat_template = CHATML_TEMPLATE
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token=None)
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
        # Untied by default: with a tied random head the last prompt token predicts itself forever.
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = fast.pad_token_id
    model.generation_config.eos_token_id = fast.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir
