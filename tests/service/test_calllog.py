"""The service call log on real SQLite: what was paid for, what the cache saved."""

import sqlite3

import pytest

from llamaduo.errors import UserError
from llamaduo.service.calllog import MIGRATIONS, SCHEMA_VERSION, CallLog
from llamaduo.service.ledger import cache_stats, ledger_from_db


def test_ledger_counts_paid_calls_and_cache_hits_per_stage_and_round(tmp_path):
    log = CallLog(tmp_path / "s.sqlite")
    log.record(ts=1.0, stage="judge", round=0, status="ok", input_tokens=10, output_tokens=5, cost_usd=0.01)
    log.record(ts=2.0, stage="judge", round=0, status="failed", error="timeout")
    log.record(ts=3.0, stage="synth", round=1, status="cached", saved_usd=0.02, input_tokens=7, output_tokens=3)
    ledger = ledger_from_db(log.conn)
    assert ledger["total"] == {
        "calls": 2, "cached": 1, "failed": 1, "input_tokens": 10, "output_tokens": 5, "usd": 0.01, "saved_usd": 0.02,
        "possibly_billed": 0, "possibly_billed_usd": 0.0,
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


def fill(log, n):
    """n calls through the client's write path, inside an event loop (grouped commits)."""
    import asyncio

    async def go():
        for i in range(n):
            base = {"ts": float(i), "stage": ("judge", "synth")[i % 2], "round": i % 7, "provider": "openai",
                    "model": ("gpt-4o-mini", "gpt-4o", None)[i % 3], "request_hash": f"h{i:08d}", "sample_index": i % 5}
            if i % 10 == 0:
                log.record(**base, attempt=1, status="http_429", http_status=429, error="slow down")
            elif i % 10 == 1:
                log.record(**base, attempt=0, status="cached", saved_usd=0.001, input_tokens=3, output_tokens=2)
            elif i % 10 == 2:
                log.record(**base, attempt=3, status="failed", error="gave up")
            else:
                log.record_reply({**base, "attempt": 1, "status": "ok", "input_tokens": i % 13, "output_tokens": i % 7,
                                  "cost_usd": i * 1e-6, "raw_reply": f"reply {i}"}, (base["model"], f"reply {i}", i % 13, i % 7, i * 1e-6))
            if i % 1000 == 999:
                await asyncio.sleep(0)

    asyncio.run(go())
    log.flush()


def summed_ledger(conn):
    """The ledger as the first releases computed it: summed over every call."""
    conn.execute("CREATE TEMP VIEW scan AS SELECT * FROM calls")
    q = ("SELECT stage, round, COUNT(*) FILTER (WHERE status!='cached'), COUNT(*) FILTER (WHERE status='cached'),"
         " COUNT(*) FILTER (WHERE status='failed'), COALESCE(SUM(CASE WHEN status!='cached' THEN input_tokens END),0),"
         " COALESCE(SUM(CASE WHEN status!='cached' THEN output_tokens END),0), ROUND(COALESCE(SUM(cost_usd),0), 6),"
         " ROUND(COALESCE(SUM(saved_usd),0), 6) FROM scan GROUP BY stage, round ORDER BY stage, round")
    return [tuple(r) for r in conn.execute(q)]


def plan(conn, sql, args=()):
    return " | ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))


def test_cache_lookups_and_ledger_upkeep_use_their_indexes_in_a_20k_row_log(tmp_path):
    log = CallLog(tmp_path / "s.sqlite")
    fill(log, 20_000)
    conn = log.conn
    assert conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 20_000
    lookup = plan(conn, "SELECT raw_reply, input_tokens, output_tokens, cost_usd FROM cache WHERE request_hash=?", ("h1",))
    assert "SEARCH cache USING PRIMARY KEY (request_hash=?)" in lookup
    upkeep = plan(conn, "UPDATE ledger SET paid = paid + 1 WHERE stage IS ? AND round IS ? AND model IS ?", ("judge", 1, None))
    assert "USING INDEX ledger_key" in upkeep and "SCAN" not in upkeep
    # The ledger never reads `calls`: its query plans touch only the small `ledger` table.
    ledger_sql = "SELECT stage, round, SUM(paid) FROM ledger GROUP BY stage, round ORDER BY stage, round"
    assert "calls" not in plan(conn, ledger_sql)
    assert log.cached("h00000003") == ("reply 3", 3, 3, 3e-06) and log.cached("nope") is None
    assert conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] == 2 * 7 * 3
    log.close()


def test_the_ledger_kept_by_the_trigger_matches_a_sum_over_every_call(tmp_path):
    log = CallLog(tmp_path / "s.sqlite")
    fill(log, 3000)
    log.record(ts=1.0, status="ok", cost_usd=0.5, input_tokens=1)  # no stage, round or model at all
    ledger = log.ledger()
    expected = summed_ledger(log.conn)
    got = [(*(k.split("/r")[0], int(k.split("/r")[1]) if "/r" in k else None), v["calls"], v["cached"], v["failed"],
            v["input_tokens"], v["output_tokens"], v["usd"], v["saved_usd"]) for k, v in ledger["by_stage"].items()]
    assert [(("None" if s is None else s), *rest) for s, *rest in expected] == got
    assert log.totals() == pytest.approx((sum(r[7] for r in expected), sum(r[5] + r[6] for r in expected)))
    assert sorted(log.models_answered()) == ["gpt-4o", "gpt-4o-mini"]
    log.close()


def test_writes_made_in_one_event_loop_pass_share_one_commit(tmp_path):
    import asyncio

    log = CallLog(tmp_path / "s.sqlite")
    commits = []
    log.conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)

    async def go():
        for i in range(50):
            log.record_reply({"ts": 0.0, "request_hash": f"h{i}", "status": "ok", "raw_reply": "r"}, ("m", "r", 1, 1, 0.0))
        assert log.cached("h7") == ("r", 1, 1, 0.0)  # visible before its commit
        await asyncio.sleep(0)
        assert len(commits) == 1
        log.record(ts=0.0, status="cached")
        await asyncio.sleep(0)

    asyncio.run(go())
    assert len(commits) == 2
    log.record(ts=0.0, status="cached")  # outside a loop: committed at once
    assert len(commits) == 3
    log.close()


def test_a_second_reply_for_a_cached_hash_keeps_its_own_text_in_its_call(tmp_path):
    log = CallLog(tmp_path / "s.sqlite")
    for text in ("first", "second"):  # two identical requests answered concurrently
        log.record_reply({"ts": 0.0, "request_hash": "h", "status": "ok", "raw_reply": text}, ("m", text, 1, 1, 0.0))
    assert log.cached("h")[0] == "first"
    assert [r for (r,) in log.conn.execute("SELECT raw_reply FROM call_replies ORDER BY id")] == ["first", "second"]
    log.close()


def test_a_version_1_log_is_migrated_without_losing_a_reply_or_a_cent(tmp_path):
    db = tmp_path / "service.sqlite"
    conn = sqlite3.connect(db)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    for i in range(200):
        status = ("ok", "cached", "http_500")[i % 3]
        conn.execute("INSERT INTO calls (ts, stage, round, model, request_hash, status, input_tokens, output_tokens, cost_usd,"
                     " saved_usd, raw_reply) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                     (i, "judge", i % 4, "gpt-4o", f"h{i}", status, 10, 5, 0.01 if status == "ok" else 0,
                      0.01 if status == "cached" else 0, f"r{i}" if status == "ok" else None))
        if status == "ok" and i % 2 == 0:  # half the good replies were cached (as an earlier client would)
            conn.execute("INSERT INTO cache VALUES (?, 'gpt-4o', ?, 10, 5, 0.01, ?)", (f"h{i}", f"r{i}", i))
    conn.commit()
    before = summed_ledger(conn)
    replies = conn.execute("SELECT id, raw_reply FROM calls ORDER BY id").fetchall()
    conn.close()
    log = CallLog(db)
    assert version(db) == SCHEMA_VERSION
    assert summed_ledger(log.conn) == before
    assert [tuple(r) for r in log.conn.execute("SELECT id, raw_reply FROM call_replies ORDER BY id")] == replies
    kept = log.conn.execute("SELECT COUNT(*) FROM calls WHERE raw_reply IS NOT NULL").fetchone()[0]
    assert kept == 33  # the 67 good replies less the 34 the cache holds
    assert log.cached("h0") == ("r0", 10, 5, 0.01) and log.conn.execute(
        "SELECT 1 FROM sqlite_master WHERE name='calls_hash'").fetchone() is None
    totals = log.totals()
    log.close()
    assert totals == pytest.approx((0.67, (67 + 66) * 15))  # every attempt but the cache hits


def test_an_attempt_a_dead_process_sent_but_never_heard_back_is_counted_as_possibly_billed(tmp_path):
    from llamaduo.service.calllog import CallLog
    from llamaduo.service.ledger import possibly_billed

    log = CallLog(tmp_path / "service.sqlite")
    row = log.sending("h1", 1, "judge", 0)
    log.answered(row)
    log.flush()
    log.sending("h2", 1, "judge", 0, est_usd=0.25, est_tokens=1200)  # in flight when the process died
    assert log.totals() == (0.0, 0)  # this process's own call in flight: not yet spent
    with log.lock, log.conn:
        log.conn.execute("UPDATE sent SET pid = -1")  # as if written by a process now gone
    assert possibly_billed(log.conn) == 1
    total = ledger_from_db(log.conn)["total"]
    assert total["possibly_billed"] == 1 and total["possibly_billed_usd"] == 0.25
    assert log.totals() == (0.25, 1200)  # the budget counts the most it may have cost
    log.close()


def test_a_resumed_run_counts_calls_in_flight_at_the_kill_against_its_budget(tmp_path):
    from llamaduo.config import ServiceConfig
    from llamaduo.service.api import BudgetExceeded
    from llamaduo.service.calllog import CallLog
    from llamaduo.service.pricing import Budget

    log = CallLog(tmp_path / "service.sqlite")
    log.sending("h1", 1, "synth", 1, est_usd=0.6, est_tokens=4000)
    with log.lock, log.conn:
        log.conn.execute("UPDATE sent SET pid = -1")
    budget = Budget(ServiceConfig(max_usd=0.5), *log.totals())  # what a resumed ServiceClient seeds itself with
    with pytest.raises(BudgetExceeded, match=r"spent \$0.6000 of max_usd \$0.5"):
        budget.check()
    log.close()
