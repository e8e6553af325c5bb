"""Provider faults and the one retry loop (one backoff-with-jitter policy) for every service call.

A provider turns its SDK's and transport's failures into a `ServiceFault` at the boundary (see
`providers`); `retrying` retries only those. Any other exception is a bug on our side and
propagates at once: retrying it would only hide it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class ServiceFault(Exception):
    """A failure of the provider, the transport or the provider's reply body."""

    def __init__(
        self, status: str, message: str, http_status: int | None = None, retry_after: float | None = None,
        limit_spent: bool = False,
    ):
        super().__init__(message)
        self.status = status  # the call log's status: timeout, http_429, http_5xx, client_error, ...
        self.message = message
        self.http_status = http_status
        self.retry_after = retry_after
        self.limit_spent = limit_spent  # a 429 whose headers say a rate limit's remainder is 0

    @property
    def retryable(self) -> bool:
        # a 4xx other than 408/409/429, or a 5xx that says the request is invalid, will not change
        return self.status not in ("client_error", "invalid_request")


def fault_from(e: BaseException) -> ServiceFault:
    """Classify an SDK/transport exception (both SDKs expose `status_code` and `response.headers`)."""
    status_code = getattr(e, "status_code", None)
    headers = getattr(getattr(e, "response", None), "headers", None) or {}
    name = type(e).__name__
    msg = f"{name}: {str(e).splitlines()[0][:300]}" if str(e) else name
    body = error_body(e)
    if body and body not in msg:
        msg = f"{msg} | body: {body}"  # the provider's whole error: the first line alone often says nothing
    if isinstance(e, TimeoutError) or "Timeout" in name:
        return ServiceFault("timeout", msg)
    if isinstance(status_code, int) and status_code >= 400:
        return fault_for_status(status_code, headers, msg)
    if "Connection" in name or isinstance(e, ConnectionError):
        return ServiceFault("connection_error", msg)
    return ServiceFault("malformed", msg)


INVALID_REQUEST = re.compile(r"validation error|invalid[ _]request|unrecognized request argument", re.I)
ERROR_BODY_LIMIT = 4000


def error_body(e: BaseException) -> str:
    """The text of an HTTP error's response body (what the provider said), on one line; '' if none."""
    response = getattr(e, "response", None)
    try:
        text = response.text if response is not None else ""
    except Exception:  # a streamed body that was never read
        text = ""
    return " ".join(str(text or "").split())[:ERROR_BODY_LIMIT]


def fault_for_status(status_code: int, headers: Any, message: str) -> ServiceFault:
    """The fault for an HTTP error status: 429, 5xx, 408 and 409 are retried, other 4xx are not —
    nor a 5xx that says the request itself is invalid (llama.cpp answers 500 to a request it cannot validate)."""
    if status_code >= 500 and INVALID_REQUEST.search(message):
        return ServiceFault("invalid_request", message, status_code)
    if status_code == 429 or status_code >= 500 or status_code in (408, 409):
        return ServiceFault(
            f"http_{status_code}", message, status_code, parse_retry_after(headers),
            limit_spent=status_code == 429 and limit_spent(headers),
        )
    return ServiceFault("client_error", message, status_code)


# Rate-limit headers that give what is left of a limit (OpenAI's, Azure's, Anthropic's).
_REMAINING = (
    "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens",
    "anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-input-tokens-remaining", "anthropic-ratelimit-output-tokens-remaining",
)


def limit_spent(headers: Any) -> bool:
    """True when a response says one of its rate limits has nothing left."""
    if not hasattr(headers, "get"):
        return False
    return any(str(headers.get(k, "")).strip() == "0" for k in _REMAINING)


def parse_retry_after(headers: Any) -> float | None:
    for key in ("retry-after", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        v = headers.get(key) if hasattr(headers, "get") else None
        if v is None:
            continue
        m = re.fullmatch(r"\s*([\d.]+)\s*(ms|s)?\s*", str(v))
        if m:
            return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    return None


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    base_s: float
    max_s: float

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (so parallel callers spread out); never under Retry-After."""
        d = min(self.max_s, self.base_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        return d if retry_after is None else max(d, retry_after)


OnFault = Callable[[ServiceFault, int, float | None], None]
"""Told of each fault: (fault, attempt, delay before the next attempt or None when giving up)."""


async def retrying(
    attempt: Callable[[int], Awaitable[T]],
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]],
    on_fault: OnFault | None = None,
) -> T:
    """Call `attempt(n)` for n = 1, 2, ... until it returns; a `ServiceFault` is retried up to
    `policy.max_retries` times (unless not retryable), then re-raised. Nothing else is caught."""
    n = 1
    while True:
        try:
            return await attempt(n)
        except ServiceFault as fault:
            delay = policy.delay(n, fault.retry_after) if fault.retryable and n <= policy.max_retries else None
            if on_fault is not None:
                on_fault(fault, n, delay)
            if delay is None:
                raise
        await sleep(delay)
        n += 1
