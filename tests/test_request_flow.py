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


def test_a_900_kb_prompt_is_refused_while_a_normal_client_beside_it_stays_fast(untrained):  # noqa: F811
    import threading
    import time

    with structured(untrained, context_length=2048) as srv:
        normal = client(srv)
        normal.chat.completions.create(model="tiny-student", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        alone = []
        for _ in range(3):
            t0 = time.perf_counter()
            normal.chat.completions.create(model="tiny-student", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
            alone.append(time.perf_counter() - t0)
        refused: list[float] = []

        def abuse() -> None:
            big = client(srv)
            for _ in range(3):  # 900 KB, under the 1 MB body limit
                t0 = time.perf_counter()
                with pytest.raises(openai.BadRequestError) as e:
                    big.chat.completions.create(model="tiny-student", max_tokens=16,
                                                messages=[{"role": "user", "content": "order three mugs " * 52_000}])
                assert e.value.code == "context_length_exceeded"
                refused.append(time.perf_counter() - t0)

        hostile = threading.Thread(target=abuse)
        hostile.start()
        beside = []
        while hostile.is_alive():
            t0 = time.perf_counter()
            normal.chat.completions.create(model="tiny-student", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
            beside.append(time.perf_counter() - t0)
        hostile.join()
    assert len(refused) == 3 and max(refused) < 10
    # The normal client's requests are not held up by the huge ones: within a few of its own latencies.
    assert beside and max(beside) < 1.0 + 5 * max(alone), (alone, beside, refused)
