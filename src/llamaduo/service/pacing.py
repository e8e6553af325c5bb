"""Client-side pacing under the service's requests- and tokens-per-minute limits."""

from __future__ import annotations

import time
from collections.abc import Callable

# Limits are usually enforced over a sliding minute. A bucket that refills at 98 % of the
# limit and holds 1 % of it as burst can never put more than 99 % of the limit in any 60 s
# window, so it runs close to the limit without ever drawing a 429.
PACE_RATE = 0.98
PACE_BURST = 0.01


class _Bucket:
    """Generic cell rate algorithm: when may a request of weight `n` go, given those booked?"""

    def __init__(self, per_minute: int):
        self.rate = PACE_RATE * per_minute / 60.0
        self.capacity = max(1.0, PACE_BURST * per_minute)
        self.tat = float("-inf")  # time at which the bucket would be full again

    def book(self, now: float, n: float) -> float:
        tat = max(self.tat, now)
        self.tat = tat + n / self.rate
        return max(now, self.tat - self.capacity / self.rate)

    def refund(self, n: float) -> None:
        self.tat -= n / self.rate


class Pacer:
    """Requests- and tokens-per-minute pacing plus a shared back-off after a 429.

    `reserve` books a send time for one request (so requests already waiting keep their
    order and spacing) and returns how long to wait for it.
    """

    def __init__(self, rpm: int | None, tpm: int | None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.requests = _Bucket(rpm) if rpm else None
        self.tokens = _Bucket(tpm) if tpm else None
        self.not_before = float("-inf")

    def reserve(self, est_tokens: int) -> float:
        now = self.clock()
        at = max(now, self.not_before)
        if self.requests:
            at = max(at, self.requests.book(at, 1))
        if self.tokens:
            at = max(at, self.tokens.book(at, est_tokens))
        return at - now

    def wait_left(self) -> float:
        """Time still to wait because of a back-off announced after the slot was booked."""
        return self.not_before - self.clock()

    def correct(self, estimated: int, actual: int) -> None:
        """Settle the tokens booked for a request once its usage is known."""
        if self.tokens:
            self.tokens.refund(estimated - actual)

    def back_off(self, seconds: float) -> None:
        """After a 429 nobody sends before `seconds`, then sending resumes at the paced rate."""
        self.not_before = max(self.not_before, self.clock() + seconds)
        for bucket in (self.requests, self.tokens):
            if bucket:  # no burst right after the server said stop
                bucket.tat = max(bucket.tat, self.not_before + bucket.capacity / bucket.rate)
