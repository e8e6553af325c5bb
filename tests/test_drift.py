"""Drift: a window of live traffic judged below target engages fallback; recovery disengages it."""

from __future__ import annotations

import pytest

from llamaduo.config import Config
from llamaduo.demo.simulator import SimulatedService
from llamaduo.drift import DriftMonitor, window_stat
from llamaduo.monitor_store import MonitorStore
from llamaduo.service import ServiceClient
from tests.monitoring import ask, config, responder, sender, serve, service_answers, student, task_a, task_b


def _served_by(srv, prompt: str) -> str:
    reply = ask(srv, prompt)
    assert reply.http_response.status_code == 200
    return reply.headers["x-llamaduo-served-by"]


def test_drift_to_another_task_engages_fallback_within_one_window_and_recovery_disengages_it(tmp_path):
    answers = service_answers()
    known = dict(task_a(i) for i in range(200))
    with SimulatedService(responder(answers)) as svc:
        cfg = config(svc, tmp_path, fallback=True)
        shadow, store, drift = sender(cfg, tmp_path, rate=1.0, drift=True)
        fallback = ServiceClient(cfg.service, db_path=tmp_path / "service.sqlite")
        with serve(student(known), cfg, fallback_client=fallback, shadow=shadow, drift=drift) as srv:
            assert {_served_by(srv, task_a(n)[0]) for n in range(8)} == {"local"}
            assert shadow.drain(30) and not drift.drifted
            # Live traffic switches to a task the student never saw: one window is enough.
            assert {_served_by(srv, task_b(n)[0]) for n in range(8)} == {"local"}
            assert shadow.drain(30) and drift.drifted
            assert [e.kind for e in store.events()] == ["drift"] and "below the target 60" in drift.state.reason
            # Drifted with fallback on: the service answers; the student keeps being judged off the path.
            assert {_served_by(srv, task_a(n)[0]) for n in range(8)} == {"service"}
            assert shadow.drain(30) and not drift.drifted  # CI [100, 100] ≥ 60: recovered
            assert [e.kind for e in store.events()] == ["drift", "recovered"]
            assert _served_by(srv, task_a(9)[0]) == "local"
        windows = store.windows()
    assert [w.state for w in windows] == ["ok", "drifted", "ok"]
    assert windows[0].value == 100 and windows[1].ci_high < 60 and windows[2].ci_low >= 60
    fallback.close()


def _judged_store(tmp_path, scores: list[float]) -> MonitorStore:
    store = MonitorStore(tmp_path / "m.sqlite")
    for i, s in enumerate(scores):
        pid = store.add_pair([{"role": "user", "content": f"q{i}"}], "a", model="m", ts=float(i), service_answer="b")
        store.set_judgment(pid, s, s, s, {"precision": "r"})
    return store


def test_one_good_window_with_a_wide_ci_does_not_end_a_drift_but_two_in_a_row_do(tmp_path):
    cfg = Config(judge={"pass_rule": {"threshold": 60}}, serve={"monitor_window": 4})
    # bad window; then good-on-average but noisy windows (lower CI bound under target)
    store = _judged_store(tmp_path, [10, 12, 8, 11] + [100, 30, 100, 90] + [100, 35, 95, 100])
    drift = DriftMonitor(cfg, store)
    windows = drift.update()
    assert [w.state for w in windows] == ["drifted", "drifted", "ok"]
    assert windows[1].ci_low < 60 <= windows[1].value
    assert [e.kind for e in store.events()] == ["drift", "recovered"]
    # A restarted server remembers the state from the store.
    assert not DriftMonitor(cfg, store).drifted


@pytest.mark.parametrize(("statistic", "value"), [("mean", 55.0), ("median", 55.0), ("coverage@50", 75.0)])
def test_window_statistic_follows_the_pass_rule(statistic, value):
    v, ci = window_stat([10, 50, 60, 100], statistic)
    assert v == value and ci[0] <= v <= ci[1]
    assert window_stat([70], statistic)[1] is None  # one pair: no CI, no decision


def test_time_windows_close_once_their_time_is_over(tmp_path):
    cfg = Config(judge={"pass_rule": {"threshold": 60}}, serve={"monitor_window_s": 10})
    store = _judged_store(tmp_path, [20, 25, 30, 22, 21, 24])  # ts 0..5
    now = [5.0]
    drift = DriftMonitor(cfg, store, clock=lambda: now[0])
    assert drift.update() == []
    now[0] = 10.0
    [w] = drift.update()
    assert w.n == 6 and w.state == "drifted" and (w.start_ts, w.end_ts) == (0.0, 10.0)
