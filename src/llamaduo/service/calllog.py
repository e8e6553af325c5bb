"""The service's SQLite call log and response cache (`service.sqlite` in a run directory).

Every attempt is a row of `calls` (request hash, model, tokens, cost, latency, status); good
replies are kept once, in `cache` by request hash, and a `calls` row keeps its own reply text
only when the cache does not hold it (an unusable reply, say: `call_replies` shows either).
The ledger (what was paid for, per stage and round) is kept up to date in `ledger` by a trigger
on `calls`, so reading it never scans the log. Batch API jobs are recorded in `batches`. The
schema is versioned with `PRAGMA user_version`; opening a file applies the `MIGRATIONS` it has
not seen yet.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaduo.errors import UserError
from llamaduo.service.ledger import ledger_from_db

# Ordered schema migrations: step i (its statements) takes a file from `PRAGMA user_version`
# i to i + 1, so a file written by any earlier release is brought forward in order. Append new
# steps; never edit a released one. Step 1 is the schema that files written before versioning
# already have (at user_version 0), hence its IF NOT EXISTS.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS calls (
          id INTEGER PRIMARY KEY AUTOINCREMENT,
          ts REAL NOT NULL,
          stage TEXT, round INTEGER,
          provider TEXT, model TEXT,
          request_hash TEXT, sample_index INTEGER, attempt INTEGER,
          status TEXT, http_status INTEGER, latency_ms REAL,
          input_tokens INTEGER DEFAULT 0, output_tokens INTEGER DEFAULT 0,
          cost_usd REAL DEFAULT 0, saved_usd REAL DEFAULT 0,
          raw_reply TEXT, error TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS calls_hash ON calls(request_hash)",
        """CREATE TABLE IF NOT EXISTS cache (
          request_hash TEXT PRIMARY KEY,
          model TEXT, raw_reply TEXT NOT NULL,
          input_tokens INTEGER, output_tokens INTEGER, cost_usd REAL, ts REAL
        )""",
    ),
    # 2: a log of millions of calls. The cache keyed by its hash alone (WITHOUT ROWID: a rowid
    # table kept the hash twice, in the table and in its primary-key index); replies the cache
    # holds no longer copied into `calls`; the `calls(request_hash)` index, which no query
    # used, dropped (a third copy of every hash); the ledger kept per (stage, round, model)
    # by a trigger instead of summed over the whole log; Batch API jobs recorded for resuming.
    (
        """CREATE TABLE cache_v2 (
          request_hash TEXT PRIMARY KEY,
          model TEXT, raw_reply TEXT NOT NULL,
          input_tokens INTEGER, output_tokens INTEGER, cost_usd REAL, ts REAL
        ) WITHOUT ROWID""",
        "INSERT INTO cache_v2 SELECT request_hash, model, raw_reply, input_tokens, output_tokens, cost_usd, ts FROM cache",
        "DROP TABLE cache",
        "ALTER TABLE cache_v2 RENAME TO cache",
        """UPDATE calls SET raw_reply = NULL WHERE raw_reply IS NOT NULL
          AND raw_reply = (SELECT c.raw_reply FROM cache c WHERE c.request_hash = calls.request_hash)""",
        "DROP INDEX IF EXISTS calls_hash",
        """CREATE VIEW call_replies AS
          SELECT calls.id, calls.request_hash, calls.status, COALESCE(calls.raw_reply, cache.raw_reply) AS raw_reply
          FROM calls LEFT JOIN cache
            ON calls.raw_reply IS NULL AND calls.status IN ('ok', 'cached') AND cache.request_hash = calls.request_hash""",
        """CREATE TABLE ledger (
          stage TEXT, round INTEGER, model TEXT,
          paid INTEGER NOT NULL DEFAULT 0, cached INTEGER NOT NULL DEFAULT 0,
          failed INTEGER NOT NULL DEFAULT 0, ok INTEGER NOT NULL DEFAULT 0,
          input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
          cost_usd REAL NOT NULL DEFAULT 0, saved_usd REAL NOT NULL DEFAULT 0
        )""",
        "CREATE UNIQUE INDEX ledger_key ON ledger(stage, round, model)",
        """INSERT INTO ledger SELECT stage, round, model,
          COUNT(*) FILTER (WHERE status != 'cached'), COUNT(*) FILTER (WHERE status = 'cached'),
          COUNT(*) FILTER (WHERE status = 'failed'), COUNT(*) FILTER (WHERE status = 'ok'),
          COALESCE(SUM(CASE WHEN status != 'cached' THEN input_tokens END), 0),
          COALESCE(SUM(CASE WHEN status != 'cached' THEN output_tokens END), 0),
          COALESCE(SUM(cost_usd), 0), COALESCE(SUM(saved_usd), 0)
          FROM calls GROUP BY stage, round, model""",
        # `calls` is append-only, so one trigger on INSERT keeps the ledger exact. `IS` compares
        # NULL stage/round/model as equal (a UNIQUE index alone would not).
        """CREATE TRIGGER calls_ledger AFTER INSERT ON calls BEGIN
          INSERT INTO ledger (stage, round, model) SELECT NEW.stage, NEW.round, NEW.model
            WHERE NOT EXISTS (SELECT 1 FROM ledger WHERE stage IS NEW.stage AND round IS NEW.round AND model IS NEW.model);
          UPDATE ledger SET
            paid = paid + (NEW.status IS NOT NULL AND NEW.status != 'cached'),
            cached = cached + (NEW.status IS 'cached'),
            failed = failed + (NEW.status IS 'failed'),
            ok = ok + (NEW.status IS 'ok'),
            input_tokens = input_tokens + CASE WHEN NEW.status != 'cached' THEN COALESCE(NEW.input_tokens, 0) ELSE 0 END,
            output_tokens = output_tokens + CASE WHEN NEW.status != 'cached' THEN COALESCE(NEW.output_tokens, 0) ELSE 0 END,
            cost_usd = cost_usd + COALESCE(NEW.cost_usd, 0),
            saved_usd = saved_usd + COALESCE(NEW.saved_usd, 0)
          WHERE stage IS NEW.stage AND round IS NEW.round AND model IS NEW.model;
        END""",
        # One row per submitted provider batch: its requests are the `requests` pending hashes
        # from `first_hash` to `last_hash` in sorted order, `digest` the SHA-256 of them joined.
        """CREATE TABLE batches (
          batch_id TEXT PRIMARY KEY,
          input_file_id TEXT NOT NULL,
          model TEXT, stage TEXT, round INTEGER,
          first_hash TEXT NOT NULL, last_hash TEXT NOT NULL,
          requests INTEGER NOT NULL, bytes INTEGER NOT NULL, digest TEXT NOT NULL,
          status TEXT NOT NULL, submitted_ts REAL NOT NULL, done_ts REAL
        )""",
    ),
    (
        # Step 3: each attempt is logged (and committed) before it is sent and marked answered when it
        # returns, so a call in flight when the process died is known: sent, maybe billed, never answered.
        """CREATE TABLE IF NOT EXISTS sent (
          id INTEGER PRIMARY KEY AUTOINCREMENT,
          ts REAL NOT NULL, request_hash TEXT, attempt INTEGER, stage TEXT, round INTEGER,
          pid INTEGER, answered INTEGER NOT NULL DEFAULT 0
        )""",
    ),
    (
        # Step 4: what an attempt may cost at most (its prompt and its max_tokens, priced), so the
        # budget counts calls a dead process sent and never heard back from.
        "ALTER TABLE sent ADD COLUMN est_usd REAL NOT NULL DEFAULT 0",
        "ALTER TABLE sent ADD COLUMN est_tokens INTEGER NOT NULL DEFAULT 0",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection) -> None:
    """Bring `conn`'s file to `SCHEMA_VERSION`, all missing steps in one transaction."""
    if schema_version(conn) == SCHEMA_VERSION:
        return
    # IMMEDIATE takes the write lock before reading the version again, so two processes opening
    # the same old file never both apply a step.
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(conn)
        if version > SCHEMA_VERSION:
            raise UserError(
                f"service.sqlite has schema version {version}, newer than this llamaduo knows ({SCHEMA_VERSION}); upgrade llamaduo"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


@dataclass(frozen=True)
class BatchRecord:
    """One provider batch as the call log keeps it (see the `batches` table)."""

    batch_id: str
    input_file_id: str
    model: str | None
    stage: str | None
    round: int | None
    first_hash: str
    last_hash: str
    requests: int
    bytes: int
    digest: str
    status: str
    submitted_ts: float
    done_ts: float | None = None


_BATCH_COLS = ",".join(BatchRecord.__dataclass_fields__)
_CACHE_INSERT = "INSERT OR IGNORE INTO cache VALUES (?,?,?,?,?,?,?)"


class CallLog:
    """SQLite call log + cache. One connection, guarded by a lock.

    Writes made inside a running event loop are grouped: they wait for the end of the loop's
    current pass and then share one transaction (a pass in which many replies or cache hits
    come in costs one commit, not one each); outside a loop each write commits at once. Reads of
    the ledger and of batches commit what is waiting first; `flush` does it explicitly.
    """

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        migrate(self.conn)
        self.lock = threading.RLock()
        self._pending: list[tuple[str, Any, Any]] = []  # (kind, row, cache entry) waiting for the next commit
        self._pending_cache: dict[str, tuple[str, int, int, float]] = {}
        self._flush_scheduled = False
        self._flush_error: BaseException | None = None

    # ---- reads
    def cached(self, request_hash: str) -> tuple[str, int, int, float] | None:
        with self.lock:
            hit = self._pending_cache.get(request_hash)
            if hit is not None:
                return hit
            row = self.conn.execute(
                "SELECT raw_reply, input_tokens, output_tokens, cost_usd FROM cache WHERE request_hash=?", (request_hash,)
            ).fetchone()
        return tuple(row) if row else None  # type: ignore[return-value]

    def totals(self) -> tuple[float, int]:
        """What was paid for so far: (USD, tokens) of every attempt that was not a cache hit, plus the
        most that attempts a dead process sent and never heard back from may have cost."""
        with self.lock:
            self._flush()
            usd, tok = self.conn.execute(
                "SELECT COALESCE(SUM(cost_usd),0), COALESCE(SUM(input_tokens+output_tokens),0) FROM ledger"
            ).fetchone()
            in_flight = self.conn.execute(
                "SELECT COALESCE(SUM(est_usd),0), COALESCE(SUM(est_tokens),0) FROM sent WHERE answered=0 AND pid!=?",
                (os.getpid(),),
            ).fetchone()
        return float(usd) + float(in_flight[0]), int(tok) + int(in_flight[1])

    def ledger(self) -> dict[str, Any]:
        with self.lock:
            self._flush()
            return ledger_from_db(self.conn)

    def models_answered(self) -> list[str]:
        """Models that gave at least one good reply."""
        with self.lock:
            self._flush()
            return [m for (m,) in self.conn.execute("SELECT DISTINCT model FROM ledger WHERE ok > 0 AND model IS NOT NULL")]

    # ---- writes
    def record(self, **row: Any) -> None:
        """One attempt (a row of `calls`)."""
        self._write("row", row, None)

    def record_reply(self, row: dict[str, Any], cache: tuple[str, str, int, int, float] | None) -> None:
        """One answered attempt and, when `cache` = (model, raw, tin, tout, cost) is given, its
        cache entry; the row keeps the reply text only when the cache did not take it."""
        self._write("reply", row, cache)

    def sending(self, request_hash: str, attempt: int, stage: str, round: int | None,
                est_usd: float = 0.0, est_tokens: int = 0) -> int:
        """Log an attempt about to go out, committed now (with what waits): a kill after this leaves
        it unanswered, so a resumed run knows it may have been billed, and for at most `est_usd` /
        `est_tokens`. Returns its id for `answered`."""
        with self.lock:
            self._flush()
            with self.conn:
                cur = self.conn.execute(
                    "INSERT INTO sent (ts, request_hash, attempt, stage, round, pid, est_usd, est_tokens)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    (time.time(), request_hash, attempt, stage, round, os.getpid(), est_usd, est_tokens),
                )
        return int(cur.lastrowid or 0)

    def answered(self, sent_id: int) -> None:
        """The attempt came back (answer or fault); committed with the next grouped writes."""
        self._write("sql", ("UPDATE sent SET answered=1 WHERE id=?", (sent_id,)), None)

    def put_cache(self, request_hash: str, model: str, raw: str, tin: int, tout: int, cost: float) -> None:
        self._write("cache", request_hash, (model, raw, tin, tout, cost))

    def _write(self, kind: str, row: Any, cache: Any) -> None:
        with self.lock:
            if self._flush_error is not None:
                err, self._flush_error = self._flush_error, None
                raise err
            self._pending.append((kind, row, cache))
            if cache is not None:
                h = row if kind == "cache" else row["request_hash"]
                self._pending_cache.setdefault(h, (cache[1], cache[2], cache[3], cache[4]))
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is None:
                self._flush()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        try:
            self.flush()
        except Exception as e:  # a callback's exception would only be logged by the loop: the next writer raises it
            self._flush_error = e

    def flush(self) -> None:
        """Commit every write still waiting."""
        with self.lock:
            self._flush()

    def _flush(self, *also: tuple[str, tuple[Any, ...]]) -> None:
        """Commit the waiting writes, and the statements `also`, in one transaction."""
        self._flush_scheduled = False
        if not self._pending and not also:
            return
        pending, self._pending = self._pending, []
        now = time.time()
        try:
            with self.conn:
                for kind, row, cache in pending:
                    if kind == "sql":
                        self.conn.execute(*row)
                        continue
                    if kind == "cache":
                        self.conn.execute(_CACHE_INSERT, (row, *cache, now))
                        continue
                    if cache is not None:
                        took = self.conn.execute(_CACHE_INSERT, (row["request_hash"], *cache, now)).rowcount
                        if took:
                            row = {k: v for k, v in row.items() if k != "raw_reply"}
                    cols = ",".join(row)
                    self.conn.execute(f"INSERT INTO calls ({cols}) VALUES ({','.join('?' * len(row))})", tuple(row.values()))
                for sql, args in also:
                    self.conn.execute(sql, args)
        except BaseException:
            self._pending = pending + self._pending  # rolled back: kept for the next commit
            raise
        self._pending_cache.clear()

    # ---- Batch API jobs
    def add_batch(self, record: BatchRecord) -> None:
        """Record a submitted batch at once, so a process that dies next still knows its id."""
        with self.lock:
            self._flush((
                f"INSERT INTO batches ({_BATCH_COLS}) VALUES ({','.join('?' * len(BatchRecord.__dataclass_fields__))})",
                tuple(record.__dict__.values()),
            ))

    def open_batches(self, model: str) -> list[BatchRecord]:
        """Batches of `model` submitted but whose results were never logged."""
        with self.lock:
            self._flush()
            rows = self.conn.execute(
                f"SELECT {_BATCH_COLS} FROM batches WHERE done_ts IS NULL AND model IS ? ORDER BY submitted_ts, first_hash",
                (model,),
            ).fetchall()
        return [BatchRecord(*r) for r in rows]

    def batch_status(self, batch_id: str, status: str, done: bool = False) -> None:
        """The provider's latest status for a batch; `done` once its results are all logged
        (committed with the writes still waiting, so the results and the mark land together)."""
        with self.lock:
            self._flush(("UPDATE batches SET status=?, done_ts=? WHERE batch_id=?", (status, time.time() if done else None, batch_id)))

    def batches(self) -> list[BatchRecord]:
        with self.lock:
            self._flush()
            rows = self.conn.execute(f"SELECT {_BATCH_COLS} FROM batches ORDER BY submitted_ts, first_hash").fetchall()
        return [BatchRecord(*r) for r in rows]

    def close(self) -> None:
        with self.lock:
            self._flush()
            self.conn.close()
