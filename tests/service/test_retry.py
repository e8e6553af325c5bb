"""The one retry loop: which failures are provider faults, how long to wait, and that nothing else is retried."""

import asyncio
import json

import httpx
import openai
import pytest

from llamaduo.service.retry import RetryPolicy, ServiceFault, fault_from, parse_retry_after, retrying

POLICY = RetryPolicy(max_retries=3, base_s=1.0, max_s=8.0)


def run_retrying(attempt, policy=POLICY):
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    async def go():
        return await retrying(attempt, policy, sleep)

    return asyncio.run(go()), sleeps


def status_error(code: int, headers: dict | None = None) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx.Response(code, headers=headers or {}, request=request)
    return openai.APIStatusError("boom", response=response, body=None)


def test_faults_are_retried_until_the_attempt_succeeds():
    calls = []

    async def attempt(n: int) -> str:
        calls.append(n)
        if n < 3:
            raise ServiceFault("http_503", "busy", 503)
        return "done"

    result, sleeps = run_retrying(attempt)
    assert result == "done" and calls == [1, 2, 3] and len(sleeps) == 2


@pytest.mark.parametrize("bug", [ValueError("bad arg"), TypeError("wrong type"), KeyError("missing")])
def test_our_own_exceptions_are_not_retried(bug):
    calls = []

    async def attempt(n: int) -> None:
        calls.append(n)
        raise bug

    with pytest.raises(type(bug)):
        run_retrying(attempt)
    assert calls == [1]


def test_a_client_error_is_not_retried_and_exhausted_retries_reraise():
    calls = []

    async def rejected(n: int) -> None:
        calls.append(n)
        raise ServiceFault("client_error", "bad request", 400)

    with pytest.raises(ServiceFault):
        run_retrying(rejected)
    assert calls == [1]

    async def down(n: int) -> None:
        calls.append(n)
        raise ServiceFault("timeout", "TimeoutError")

    calls.clear()
    with pytest.raises(ServiceFault):
        run_retrying(down)
    assert calls == [1, 2, 3, 4]  # the first try and max_retries more


def test_backoff_doubles_with_jitter_under_the_cap_and_never_under_retry_after():
    for attempt, full in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 8.0)]:
        for _ in range(20):
            assert full / 2 <= POLICY.delay(attempt, None) <= full
    assert POLICY.delay(1, 5.0) == 5.0


def test_sdk_exceptions_are_classified_by_status_and_retry_after():
    f429 = fault_from(status_error(429, {"retry-after": "1.5"}))
    assert (f429.status, f429.http_status, f429.retry_after, f429.retryable) == ("http_429", 429, 1.5, True)
    assert fault_from(status_error(503)).status == "http_503"
    assert fault_from(status_error(408)).retryable
    bad = fault_from(status_error(400))
    assert (bad.status, bad.retryable) == ("client_error", False)
    req = httpx.Request("POST", "http://127.0.0.1/v1")
    assert fault_from(openai.APITimeoutError(req)).status == "timeout"
    assert fault_from(openai.APIConnectionError(request=req)).status == "connection_error"
    assert fault_from(ValueError("Expecting value")).status == "malformed"
    assert parse_retry_after({"x-ratelimit-reset-requests": "250ms"}) == 0.25


def test_the_provider_guard_turns_sdk_and_body_failures_into_faults_and_nothing_else():
    from llamaduo.config import ServiceConfig
    from llamaduo.service.providers import OpenAIProvider

    provider = OpenAIProvider(ServiceConfig())

    async def raising(e: BaseException):
        raise e

    async def guarded(e: BaseException):
        return await provider.guard(raising(e))

    with pytest.raises(ServiceFault) as body:
        asyncio.run(guarded(json.JSONDecodeError("Expecting value", '{"choices": [', 13)))
    assert body.value.status == "malformed"
    with pytest.raises(ServiceFault) as limited:
        asyncio.run(guarded(status_error(429)))
    assert limited.value.status == "http_429"
    with pytest.raises(ServiceFault):
        asyncio.run(guarded(httpx.ReadError("connection reset")))
    with pytest.raises(ValueError, match="ours"):
        asyncio.run(guarded(ValueError("ours")))
