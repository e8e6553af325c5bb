"""The steps around the engine: a request over the model's context is refused before it is batched."""

import openai
import pytest

from tests.tiny_server import client, structured, untrained  # noqa: F401


def test_a_prompt_beyond_the_context_length_is_a_400_and_a_normal_request_still_answers(untrained):  # noqa: F811
    with structured(untrained, context_length=64) as srv:
        c = client(srv)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny-student", max_tokens=16,
                                      messages=[{"role": "user", "content": "order three mugs " * 40}])
        assert e.value.code == "context_length_exceeded" and "maximum context length is 64" in str(e.value)
        with pytest.raises(openai.BadRequestError):  # a short prompt asking for too many tokens, too
            c.chat.completions.create(model="tiny-student", max_tokens=60, messages=[{"role": "user", "content": "hi"}])
        ok = c.chat.completions.create(model="tiny-student", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert ok.choices[0].finish_reason in ("stop", "length")
