"""The service's SQLite call log and response cache (`service.sqlite` in a run directory).

Every attempt is a row of `calls` (request hash, model, tokens, cost, latency, status, raw
reply); successful replies are kept in `cache` by request hash. The ledger (what was paid for,
per stage and round) and the cache statistics are read from it. The schema is versioned
with `PRAGMA user_version`; opening a file applies the `MIGRATIONS` it has not seen yet.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llamaduo.errors import UserError

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
    (
        # Step 2: each attempt is logged before it is sent and marked answered when it returns, so a
        # call in flight when the process died is known: sent, maybe billed, never answered.
        """CREATE TABLE IF NOT EXISTS sent (
          id INTEGER PRIMARY KEY AUTOINCREMENT,
          ts REAL NOT NULL, request_hash TEXT, attempt INTEGER, stage TEXT, round INTEGER,
          pid INTEGER, answered INTEGER NOT NULL DEFAULT 0
        )""",
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


class CallLog:
    """SQLite call log + cache. One connection, guarded by a lock (calls come from one loop)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        migrate(self.conn)
        self.lock = threading.Lock()

    def cached(self, request_hash: str) -> tuple[str, int, int, float] | None:
        with self.lock:
            row = self.conn.execute(
                "SELECT raw_reply, input_tokens, output_tokens, cost_usd FROM cache WHERE request_hash=?", (request_hash,)
            ).fetchone()
        return tuple(row) if row else None  # type: ignore[return-value]

    def put_cache(self, request_hash: str, model: str, raw: str, tin: int, tout: int, cost: float) -> None:
        with self.lock, self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO cache VALUES (?,?,?,?,?,?,?)", (request_hash, model, raw, tin, tout, cost, time.time())
            )

    def record(self, **row: Any) -> None:
        cols = ",".join(row)
        with self.lock, self.conn:
            self.conn.execute(f"INSERT INTO calls ({cols}) VALUES ({','.join('?' * len(row))})", tuple(row.values()))

    def sending(self, request_hash: str, attempt: int, stage: str, round: int | None) -> int:
        """Log an attempt about to go out; returns its row id for `answered`."""
        with self.lock, self.conn:
            cur = self.conn.execute(
                "INSERT INTO sent (ts, request_hash, attempt, stage, round, pid) VALUES (?,?,?,?,?,?)",
                (time.time(), request_hash, attempt, stage, round, os.getpid()),
            )
        return int(cur.lastrowid or 0)

    def answered(self, row: int) -> None:
        with self.lock, self.conn:
            self.conn.execute("UPDATE sent SET answered=1 WHERE id=?", (row,))

    def totals(self) -> tuple[float, int]:
        with self.lock:
            usd, tok = self.conn.execute(
                "SELECT COALESCE(SUM(cost_usd),0), COALESCE(SUM(input_tokens+output_tokens),0) FROM calls WHERE status!='cached'"
            ).fetchone()
        return float(usd), int(tok)

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def ledger_from_db(conn: sqlite3.Connection) -> dict[str, Any]:
    """Totals overall and per (stage, round), counting only what was paid for."""

    def agg(where: str = "", group: str = "") -> list[tuple]:
        sel = f"{group + ',' if group else ''}"
        q = (
            f"SELECT {sel} COUNT(*) FILTER (WHERE status!='cached'), COUNT(*) FILTER (WHERE status='cached'),"
            " COUNT(*) FILTER (WHERE status='failed'),"
            " COALESCE(SUM(CASE WHEN status!='cached' THEN input_tokens END),0),"
            " COALESCE(SUM(CASE WHEN status!='cached' THEN output_tokens END),0),"
            " COALESCE(SUM(cost_usd),0), COALESCE(SUM(saved_usd),0) FROM calls"
            f" {where} {'GROUP BY ' + group if group else ''}"
        )
        return conn.execute(q).fetchall()

    def row_dict(r: Sequence[Any]) -> dict[str, Any]:
        calls, cached, failed, tin, tout, usd, saved = r
        return {
            "calls": calls,
            "cached": cached,
            "failed": failed,
            "input_tokens": tin,
            "output_tokens": tout,
            "usd": round(usd, 6),
            "saved_usd": round(saved, 6),
        }

    by_stage = {}
    for r in agg(group="stage, round"):
        key = f"{r[0]}" + (f"/r{r[1]:02d}" if r[1] is not None else "")
        by_stage[key] = row_dict(r[2:])
    total = row_dict(agg()[0])
    total["possibly_billed"] = possibly_billed(conn)
    return {"total": total, "by_stage": by_stage}


def possibly_billed(conn: sqlite3.Connection) -> int:
    """Attempts sent by a process that died before their reply came back: the provider may bill them."""
    try:
        return int(conn.execute("SELECT COUNT(*) FROM sent WHERE answered=0 AND pid!=?", (os.getpid(),)).fetchone()[0])
    except sqlite3.OperationalError:  # a call log from before step 2 (read without migrating)
        return 0


def cache_stats(db_path: Path) -> dict[str, Any]:
    """Hits, misses and money saved, from a run's service.sqlite."""
    conn = sqlite3.connect(str(db_path))
    try:
        ledger = ledger_from_db(conn)
        entries = conn.execute("SELECT COUNT(*) FROM cache").fetchone()[0]
    finally:
        conn.close()
    t = ledger["total"]
    return {
        "hits": t["cached"],
        "misses": t["calls"],
        "entries": entries,
        "saved_usd": t["saved_usd"],
        "spent_usd": t["usd"],
        "by_stage": {k: {"hits": v["cached"], "misses": v["calls"], "saved_usd": v["saved_usd"]} for k, v in ledger["by_stage"].items()},
    }
