"""Pacing under requests- and tokens-per-minute limits, on an injected clock."""

import bisect

import pytest

from llamaduo.service.pacing import Pacer


@pytest.mark.parametrize("rpm", [60, 1200, 10_000])
def test_paced_requests_never_exceed_the_limit_in_any_sliding_minute(rpm):
    now = [0.0]
    pacer = Pacer(rpm=rpm, tpm=None, clock=lambda: now[0])
    sends = []
    for _ in range(3 * rpm):
        now[0] += pacer.reserve(est_tokens=10)
        sends.append(now[0])
    worst = max(bisect.bisect_left(sends, t + 60.0) - i for i, t in enumerate(sends))
    assert worst <= rpm
    assert (len(sends) - 1) / (sends[-1] - sends[0]) >= 0.95 * rpm / 60  # and runs close to it


def test_tokens_per_minute_pacing_settles_with_actual_usage():
    now = [0.0]
    pacer = Pacer(rpm=None, tpm=6000, clock=lambda: now[0])  # ~98 tokens/s
    assert pacer.reserve(est_tokens=60) == 0.0  # within the burst allowance
    first = pacer.reserve(est_tokens=1000)
    assert first > 5  # an estimate this large has to wait for its share
    pacer.correct(estimated=1000, actual=100)  # the reply was short: the rest is given back
    assert pacer.reserve(est_tokens=60) < first


def test_429_holds_every_worker_until_retry_after():
    now = [0.0]
    pacer = Pacer(rpm=600, tpm=None, clock=lambda: now[0])
    pacer.back_off(2.0)
    assert pacer.reserve(est_tokens=1) >= 2.0 and pacer.wait_left() == 2.0


def test_requests_held_back_by_the_token_limit_still_keep_the_request_spacing():
    now = [0.0]
    pacer = Pacer(rpm=600, tpm=6000, clock=lambda: now[0])  # 9.8 requests/s, burst 6; 98 tokens/s
    sends = [pacer.reserve(est_tokens=3000)] + [pacer.reserve(est_tokens=1) for _ in range(50)]
    assert sends[0] > 25  # the big one waits for its tokens...
    # ...and the small ones queued behind it do not go out in one bunch when it does.
    worst = max(bisect.bisect_left(sends, t + 1.0) - i for i, t in enumerate(sends))
    assert worst <= 6 + 10
    assert pacer.waits["tokens"] >= 1 and pacer.waits["requests"] >= 40


def test_a_refused_request_gives_its_whole_booking_back():
    now = [0.0]
    pacer = Pacer(rpm=60, tpm=600, clock=lambda: now[0])
    assert pacer.reserve(est_tokens=5) == 0.0
    second = pacer.reserve(est_tokens=5)
    assert second > 0
    pacer.release(5)  # answered 429/5xx: the service counted none of it
    assert pacer.reserve(est_tokens=5) == second
