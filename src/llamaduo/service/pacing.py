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

    def earliest(self, now: float, n: float) -> float:
        """The first time at or after `now` when weight `n` fits."""
        return max(now, max(self.tat, now) + (n - self.capacity) / self.rate)

    def book(self, at: float, n: float) -> None:
        # A request heavier than the burst was let go only after the bucket ran empty by its
        # excess (see `earliest`); that wait pays for the excess, so the bucket ends up full.
        self.tat = max(self.tat + n / self.rate, at + min(n, self.capacity) / self.rate)

    def refund(self, n: float) -> None:
        self.tat -= n / self.rate


class Pacer:
    """Requests- and tokens-per-minute pacing plus a shared back-off after a 429.

    `reserve` books a send time for one request (so requests already waiting keep their
    order and spacing) and returns how long to wait for it. Both buckets are booked at the same
    time, the later of the two: booking each at its own earliest time would let a request held
    back by the token bucket go out right behind others and bunch them past the request limit.
    """

    def __init__(self, rpm: int | None, tpm: int | None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.requests = _Bucket(rpm) if rpm else None
        self.tokens = _Bucket(tpm) if tpm else None
        self.not_before = float("-inf")
        # How many reservations had to wait, by the limit that set their time (for benchmarks).
        self.waits = {"requests": 0, "tokens": 0}

    def reserve(self, est_tokens: int) -> float:
        now = self.clock()
        at = max(now, self.not_before)
        at_r = self.requests.earliest(at, 1) if self.requests else at
        at_t = self.tokens.earliest(at, est_tokens) if self.tokens else at
        if max(at_r, at_t) > at:
            self.waits["tokens" if at_t > at_r else "requests"] += 1
            at = max(at_r, at_t)
        if self.requests:
            self.requests.book(at, 1)
        if self.tokens:
            self.tokens.book(at, est_tokens)
        return at - now

    def wait_left(self) -> float:
        """Time still to wait because of a back-off announced after the slot was booked."""
        return self.not_before - self.clock()

    def correct(self, estimated: int, actual: int) -> None:
        """Settle the tokens booked for a request once its usage is known."""
        if self.tokens:
            self.tokens.refund(estimated - actual)

    def release(self, estimated: int) -> None:
        """Give back a whole booking: the request was refused, so the service counted none of it."""
        if self.requests:
            self.requests.refund(1)
        if self.tokens:
            self.tokens.refund(estimated)

    def back_off(self, seconds: float) -> None:
        """After a 429 nobody sends before `seconds`, then sending resumes at the paced rate."""
        self.not_before = max(self.not_before, self.clock() + seconds)
        for bucket in (self.requests, self.tokens):
            if bucket:  # no burst right after the server said stop
                bucket.tat = max(bucket.tat, self.not_before + bucket.capacity / bucket.rate)
