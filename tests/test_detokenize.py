from __future__ import annotations

from llamaduo.config import ModelConfig
from llamaduo.detokenize import TextStream, whole_text
from llamaduo.models import load_tokenizer
from tests.tiny import tiny_model  # noqa: F401


def test_a_stream_decodes_by_the_rust_tokenizer_only_when_the_wrapper_would_add_nothing(tiny_model):  # noqa: F811
    tok, _ = load_tokenizer(ModelConfig(base=str(tiny_model)))
    ids = list(range(3, 60))
    assert tok.clean_up_tokenization_spaces is False
    assert whole_text(tok)(ids) == tok.decode(ids, skip_special_tokens=True)
    calls = []

    class CleansUp:  # a tokenizer whose wrapper does more than its Rust tokenizer: always through `decode`
        clean_up_tokenization_spaces = True
        _tokenizer = tok._tokenizer

        def decode(self, ids, skip_special_tokens=False):
            calls.append(ids)
            return "cleaned"

    assert whole_text(CleansUp())(ids) == "cleaned" and calls == [ids]
    stream = TextStream(tok, [])
    pushed = "".join(stream.push(t) for t in ids) + stream.finish()
    assert pushed == tok.decode(ids, skip_special_tokens=True).strip()
