"""The service call log on real SQLite: what was paid for, what the cache saved."""

from llamaduo.calllog import CallLog, cache_stats, ledger_from_db


def test_ledger_counts_paid_calls_and_cache_hits_per_stage_and_round(tmp_path):
    log = CallLog(tmp_path / "s.sqlite")
    log.record(ts=1.0, stage="judge", round=0, status="ok", input_tokens=10, output_tokens=5, cost_usd=0.01)
    log.record(ts=2.0, stage="judge", round=0, status="failed", error="timeout")
    log.record(ts=3.0, stage="synth", round=1, status="cached", saved_usd=0.02, input_tokens=7, output_tokens=3)
    ledger = ledger_from_db(log.conn)
    assert ledger["total"] == {
        "calls": 2, "cached": 1, "failed": 1, "input_tokens": 10, "output_tokens": 5, "usd": 0.01, "saved_usd": 0.02,
    }
    assert ledger["by_stage"]["judge/r00"]["calls"] == 2 and ledger["by_stage"]["synth/r01"]["cached"] == 1
    assert log.totals() == (0.01, 15)  # cache hits cost nothing and count no tokens against the budget
    log.close()


def test_cached_replies_come_back_by_request_hash_and_are_counted_in_the_stats(tmp_path):
    log = CallLog(tmp_path / "s.sqlite")
    log.put_cache("h1", "gpt-4o", '{"ok": 1}', 12, 4, 0.5)
    log.record(ts=1.0, stage="judge", round=0, status="ok", cost_usd=0.5)
    log.record(ts=2.0, stage="judge", round=0, status="cached", saved_usd=0.5)
    assert log.cached("h1") == ('{"ok": 1}', 12, 4, 0.5) and log.cached("h2") is None
    log.close()
    stats = cache_stats(tmp_path / "s.sqlite")
    assert (stats["hits"], stats["misses"], stats["entries"], stats["saved_usd"]) == (1, 1, 1, 0.5)
    assert stats["by_stage"]["judge/r00"] == {"hits": 1, "misses": 1, "saved_usd": 0.5}
