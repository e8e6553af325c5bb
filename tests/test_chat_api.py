"""The OpenAI chat-completions wire format as the official openai client and raw SSE readers see it."""

from __future__ import annotations

import httpx

from tests.tiny_server import QUESTIONS, client, direct, gen, running, tiny  # noqa: F401


def test_streaming_sends_openai_chunks_and_ends_with_done(tiny, gen):  # noqa: F811
    with running(gen) as srv:
        stream = client(srv).chat.completions.create(
            model="tiny-student", messages=[{"role": "user", "content": QUESTIONS[1]}], stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        with httpx.stream(
            "POST", srv.base_url + "/chat/completions",
            json={"model": "tiny-student", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
        ) as resp:
            lines = [ln for ln in resp.iter_lines() if ln]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct(tiny, QUESTIONS[1]) != ""
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert resp.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
