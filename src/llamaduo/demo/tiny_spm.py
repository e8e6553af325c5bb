"""Tiny Llama- and Qwen2-family models with a SentencePiece tokenizer, built offline in-process.

llama.cpp's converter recognises a BPE tokenizer only by the hash of its pre-tokenizer output, so
the home-made byte-level BPE of `tiny.build_tiny_model` is refused; a SentencePiece model
(`tokenizer.model`) is read directly. These builders train one on a few kilobytes of text and
wrap it as a transformers `LlamaTokenizer`, so deploy → GGUF → llama.cpp can be tested end to end
for each family without a download.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

from llamaduo.demo.tiny import _TINY_CORPUS
from llamaduo.models import CHATML_SPECIAL, CHATML_TEMPLATE

Family = Literal["llama", "qwen2"]
FAMILIES: tuple[Family, ...] = ("llama", "qwen2")


def _train_spm(vocab_size: int, dummy_prefix: bool) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    lines = [line for line in _TINY_CORPUS.splitlines() if line.strip()] * 4
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, control_symbols=CHATML_SPECIAL, pad_id=3, character_coverage=1.0,
        add_dummy_prefix=dummy_prefix, minloglevel=2,
    )
    return buf.getvalue()


def spm_tokenizer(model_proto: bytes, add_prefix_space: bool = False):  # -> LlamaTokenizer
    """A transformers tokenizer equivalent to a SentencePiece BPE model (vocab + merges by score)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges: list[tuple[str, str, float]] = []
    # The merges transformers' own SentencePiece extractor derives: every split of a piece into
    # two pieces, applied in the order of the merged piece's score.
    for piece, i in vocab.items():
        local = [(piece[:k], piece[k:], sp.get_score(i)) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]]))
    ordered = [(a, b) for a, b, _ in sorted(merges, key=lambda x: x[2], reverse=True)]
    tok = LlamaTokenizer(
        vocab=vocab, merges=ordered, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
        pad_token="<pad>", add_prefix_space=add_prefix_space, padding_side="left",
    )
    tok.add_special_tokens({"additional_special_tokens": CHATML_SPECIAL})
    return tok


def _answer_in_plain_pieces(model, tok, proto: bytes) -> None:
    """Keep a random model's answers to plain text pieces, with clear margins between candidates.

    Left random, it emits byte-fallback and control tokens, which every runtime renders its own way
    (replacement characters, nothing, ▅), so answers could not be compared as text. Every embedding
    gets a large constant first coordinate, which the final norm turns into a constant feature; the
    output rows of byte, control and unknown tokens read it with a large negative weight (a bias that
    rules them out) and the other rows do not read it at all.
    """
    import sentencepiece as spm
    import torch

    sp = spm.SentencePieceProcessor(model_proto=proto)
    banned = [i for i in range(sp.get_piece_size()) if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)]
    banned += [i for i in tok.all_special_ids if i not in banned]
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 0.1  # ~5× the other coordinates: a feature, not the signal
        head = model.get_output_embeddings().weight
        head.mul_(5.0)  # wider logit gaps: a rounding difference between runtimes rarely flips the argmax
        head[:, 0] = 0.0
        head[banned, 0] = -5.0


def build_tiny_spm_model(out_dir: Path, family: Family = "llama", seed: int = 0, vocab_size: int = 400) -> Path:
    """A 2-layer model of `family` (hidden 64) with a ChatML SentencePiece tokenizer; saved like a checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # No dummy prefix: llama.cpp's converter passes add_prefix_space=False on for Llama, so neither
    # runtime puts a space after a special token. (For Qwen2 it writes nothing, and llama.cpp's
    # default adds one: `gguf.py` then records it from the tokenizer, see `convert`.)
    proto = _train_spm(vocab_size, dummy_prefix=False)
    tok = spm_tokenizer(proto)
    tok.chat_template = CHATML_TEMPLATE
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    _answer_in_plain_pieces(model, tok, proto)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "tokenizer.model").write_bytes(proto)  # what llama.cpp's converter reads
    return out_dir
