"""The service call log on real SQLite: what was paid for, what the cache saved."""

import sqlite3

import pytest

from llamaduo.errors import UserError
from llamaduo.service.calllog import MIGRATIONS, SCHEMA_VERSION, CallLog, cache_stats, ledger_from_db


def test_ledger_counts_paid_calls_and_cache_hits_per_stage_and_round(tmp_path):
    log = CallLog(tmp_path / "s.sqlite")
    log.record(ts=1.0, stage="judge", round=0, status="ok", input_tokens=10, output_tokens=5, cost_usd=0.01)
    log.record(ts=2.0, stage="judge", round=0, status="failed", error="timeout")
    log.record(ts=3.0, stage="synth", round=1, status="cached", saved_usd=0.02, input_tokens=7, output_tokens=3)
    ledger = ledger_from_db(log.conn)
    assert ledger["total"] == {
        "calls": 2, "cached": 1, "failed": 1, "input_tokens": 10, "output_tokens": 5, "usd": 0.01, "saved_usd": 0.02,
        "possibly_billed": 0,
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


# The schema as the first releases created it (CREATE IF NOT EXISTS, no user_version), copied
# verbatim: files written then must open, migrate and keep their rows and cache.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  ts REAL NOT NULL,
  stage TEXT, round INTEGER,
  provider TEXT, model TEXT,
  request_hash TEXT, sample_index INTEGER, attempt INTEGER,
  status TEXT, http_status INTEGER, latency_ms REAL,
  input_tokens INTEGER DEFAULT 0, output_tokens INTEGER DEFAULT 0,
  cost_usd REAL DEFAULT 0, saved_usd REAL DEFAULT 0,
  raw_reply TEXT, error TEXT
);
CREATE INDEX IF NOT EXISTS calls_hash ON calls(request_hash);
CREATE TABLE IF NOT EXISTS cache (
  request_hash TEXT PRIMARY KEY,
  model TEXT, raw_reply TEXT NOT NULL,
  input_tokens INTEGER, output_tokens INTEGER, cost_usd REAL, ts REAL
);
"""


def old_db(path):
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(OLD_SCHEMA)
    conn.execute("INSERT INTO calls (ts, stage, round, status, input_tokens, output_tokens, cost_usd) VALUES (1, 'judge', 0, 'ok', 10, 5, 0.25)")
    conn.execute("INSERT INTO cache VALUES ('h-old', 'gpt-4o', '{\"score\": 7}', 10, 5, 0.25, 1.0)")
    conn.commit()
    conn.close()


def version(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_a_call_log_written_before_schema_versioning_opens_and_migrates(tmp_path):
    db = tmp_path / "service.sqlite"
    old_db(db)
    assert version(db) == 0
    log = CallLog(db)
    assert log.cached("h-old") == ('{"score": 7}', 10, 5, 0.25)  # the old cache still replays
    assert log.totals() == (0.25, 15)  # and the old spend still counts against the budget
    log.record(ts=2.0, stage="synth", round=1, status="ok", input_tokens=1, output_tokens=1, cost_usd=0.5)
    log.close()
    assert version(db) == SCHEMA_VERSION == len(MIGRATIONS)
    assert cache_stats(db)["spent_usd"] == 0.75
    CallLog(db).close()  # opening an up-to-date file again changes nothing
    assert version(db) == SCHEMA_VERSION


def test_the_service_client_replays_a_reply_cached_in_an_old_call_log(fake_service, tmp_path):
    from llamaduo.service import ServiceClient
    from tests.conftest import service_config
    from tests.service.conftest import ask

    db = tmp_path / "service.sqlite"
    old_db(db)
    # The key the single-module client gave `ask`'s first request under `service_config`.
    old_key = "f6c621f00a187b0b0d60ba19b45e00b62507a2709b3e08dc1943ba36586b9796"
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO cache VALUES (?, 'fake-model', ?, 4, 2, 0.1, 1.0)", (old_key, '{"score": 3, "reason": "old file"}'))
    conn.commit()
    conn.close()
    [reply] = ask(ServiceClient(service_config(fake_service), db_path=db))
    assert reply.cached and reply.parsed.reason == "old file" and fake_service.count == 0


def test_a_fresh_call_log_is_created_at_the_current_version(tmp_path):
    CallLog(tmp_path / "new.sqlite").close()
    assert version(tmp_path / "new.sqlite") == SCHEMA_VERSION


def test_a_call_log_from_a_newer_release_is_refused_with_a_clear_error(tmp_path):
    db = tmp_path / "service.sqlite"
    old_db(db)
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(UserError, match="newer than this llamaduo"):
        CallLog(db)


def test_an_attempt_a_dead_process_sent_but_never_heard_back_is_counted_as_possibly_billed(tmp_path):
    from llamaduo.service.calllog import CallLog, possibly_billed

    log = CallLog(tmp_path / "service.sqlite")
    row = log.sending("h1", 1, "judge", 0)
    log.answered(row)
    log.sending("h2", 1, "judge", 0)  # in flight when the process died
    with log.lock, log.conn:
        log.conn.execute("UPDATE sent SET pid = -1")  # as if written by a process now gone
    assert possibly_billed(log.conn) == 1
    assert ledger_from_db(log.conn)["total"]["possibly_billed"] == 1
    log.close()
