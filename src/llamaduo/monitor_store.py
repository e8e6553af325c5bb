"""The run's monitoring store (`monitor.sqlite`): what live traffic looked like to the judge.

Tables: `pairs` (one shadowed request: its redacted messages, the local answer, the service
LLM's answer, timings, the judged scores with their reasons and the window it fell in),
`windows` (the rolling score of a window with its CI against the target), `events` (drift and
recovery), `counters` (shadow work dropped, by reason) and `spend` (what shadowing cost, from
the call log). No request header is ever stored, so a caller's key never reaches the file.

The schema is versioned with `PRAGMA user_version`; opening a file applies the `MIGRATIONS` it
has not seen yet (append steps, never edit a released one). WAL lets `llamaduo monitor` read
while a server writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaduo.errors import UserError

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE pairs (
          id INTEGER PRIMARY KEY AUTOINCREMENT,
          ts REAL NOT NULL, model TEXT, service_model TEXT,
          messages TEXT NOT NULL, local_answer TEXT NOT NULL, service_answer TEXT,
          local_latency_ms REAL, service_latency_ms REAL, max_tokens INTEGER,
          status TEXT NOT NULL DEFAULT 'pending', error TEXT,
          similarity REAL, precision REAL, score REAL, reasons TEXT, judged_ts REAL,
          window_id INTEGER
        )""",
        "CREATE INDEX pairs_status ON pairs(status)",
        "CREATE INDEX pairs_window ON pairs(window_id)",
        """CREATE TABLE windows (
          id INTEGER PRIMARY KEY AUTOINCREMENT,
          start_ts REAL, end_ts REAL, n INTEGER NOT NULL,
          metric TEXT, statistic TEXT, value REAL, ci_low REAL, ci_high REAL, target REAL,
          state TEXT NOT NULL
        )""",
        "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL, kind TEXT, window_id INTEGER, reason TEXT)",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "CREATE TABLE spend (stage TEXT PRIMARY KEY, usd REAL NOT NULL, ts REAL)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, path: Path | None) -> None:
    """Bring the file to `SCHEMA_VERSION` in one transaction (IMMEDIATE: two openers never both migrate)."""
    if int(conn.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise UserError(f"{path}: monitoring schema version {version}, newer than this llamaduo knows "
                            f"({SCHEMA_VERSION}); upgrade llamaduo")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


@dataclass
class Pair:
    id: int
    ts: float
    model: str | None
    service_model: str | None
    messages: list[dict[str, str]]
    local_answer: str
    service_answer: str | None
    local_latency_ms: float | None
    service_latency_ms: float | None
    max_tokens: int | None
    status: str  # pending → answered → judged; or failed / dropped
    error: str | None
    similarity: float | None
    precision: float | None
    score: float | None
    reasons: dict[str, str]
    judged_ts: float | None
    window_id: int | None


@dataclass
class Window:
    id: int
    start_ts: float | None
    end_ts: float | None
    n: int
    metric: str
    statistic: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    target: float | None
    state: str  # "ok" | "drifted": the monitor's state after this window


@dataclass
class Event:
    id: int
    ts: float
    kind: str  # "drift" | "recovered"
    window_id: int | None
    reason: str


_PAIR_COLS = ("id, ts, model, service_model, messages, local_answer, service_answer, local_latency_ms, "
              "service_latency_ms, max_tokens, status, error, similarity, precision, score, reasons, judged_ts, window_id")


def _pair(row: tuple) -> Pair:
    vals = list(row)
    vals[4] = json.loads(vals[4])
    vals[15] = json.loads(vals[15]) if vals[15] else {}
    return Pair(*vals)


class MonitorStore:
    """One connection guarded by a lock: the shadow worker writes, the server and `monitor` read."""

    def __init__(self, path: Path | None, clock: Any = time.time):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.conn = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        migrate(self.conn, self.path)
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self.lock, self.conn:
            return int(self.conn.execute(sql, args).lastrowid or 0)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    # ---- pairs
    def add_pair(self, messages: list[dict[str, str]], local_answer: str, *, model: str | None, ts: float,
                 local_latency_ms: float | None = None, max_tokens: int | None = None,
                 service_answer: str | None = None, service_model: str | None = None) -> int:
        """A shadowed request (messages already redacted); `answered` at once when the service answer is known."""
        status = "answered" if service_answer is not None else "pending"
        return self._write(
            "INSERT INTO pairs (ts, model, service_model, messages, local_answer, service_answer, local_latency_ms,"
            " max_tokens, status) VALUES (?,?,?,?,?,?,?,?,?)",
            (ts, model, service_model, json.dumps(messages, ensure_ascii=False), local_answer, service_answer,
             local_latency_ms, max_tokens, status),
        )

    def set_answer(self, pair_id: int, answer: str | None, service_model: str, latency_ms: float | None,
                   error: str | None = None) -> None:
        self._write("UPDATE pairs SET service_answer=?, service_model=?, service_latency_ms=?, status=?, error=? WHERE id=?",
                    (answer, service_model, latency_ms, "answered" if answer is not None else "failed", error, pair_id))

    def set_judgment(self, pair_id: int, similarity: float | None, precision: float | None, score: float | None,
                     reasons: dict[str, str], error: str | None = None) -> None:
        self._write(
            "UPDATE pairs SET similarity=?, precision=?, score=?, reasons=?, judged_ts=?, status=?, error=? WHERE id=?",
            (similarity, precision, score, json.dumps(reasons, ensure_ascii=False), self.clock(),
             "judged" if score is not None else "unjudged", error, pair_id),
        )

    def pairs(self, status: str | None = None, unwindowed: bool = False, limit: int | None = None) -> list[Pair]:
        where, args = [], []
        if status is not None:
            where.append("status=?")
            args.append(status)
        if unwindowed:
            where.append("window_id IS NULL")
        sql = f"SELECT {_PAIR_COLS} FROM pairs" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_pair(r) for r in self._read(sql, tuple(args))]

    def worst(self, n: int = 5) -> list[Pair]:
        """The lowest-scoring judged live items (what drift looks like)."""
        rows = self._read(f"SELECT {_PAIR_COLS} FROM pairs WHERE status='judged' ORDER BY score ASC, id LIMIT ?", (n,))
        return [_pair(r) for r in rows]

    def status_counts(self) -> dict[str, int]:
        return {s: int(c) for s, c in self._read("SELECT status, COUNT(*) FROM pairs GROUP BY status")}

    # ---- windows and events
    def add_window(self, pair_ids: list[int], *, start_ts: float | None, end_ts: float | None, metric: str,
                   statistic: str, value: float | None, ci: list[float] | None, target: float | None, state: str) -> int:
        lo, hi = (ci[0], ci[1]) if ci else (None, None)
        with self.lock, self.conn:
            wid = int(self.conn.execute(
                "INSERT INTO windows (start_ts, end_ts, n, metric, statistic, value, ci_low, ci_high, target, state)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (start_ts, end_ts, len(pair_ids), metric, statistic, value, lo, hi, target, state),
            ).lastrowid or 0)
            self.conn.executemany("UPDATE pairs SET window_id=? WHERE id=?", [(wid, i) for i in pair_ids])
        return wid

    def windows(self) -> list[Window]:
        return [Window(*r) for r in self._read(
            "SELECT id, start_ts, end_ts, n, metric, statistic, value, ci_low, ci_high, target, state FROM windows ORDER BY id")]

    def add_event(self, kind: str, window_id: int | None, reason: str) -> int:
        return self._write("INSERT INTO events (ts, kind, window_id, reason) VALUES (?,?,?,?)",
                           (self.clock(), kind, window_id, reason))

    def events(self) -> list[Event]:
        return [Event(*r) for r in self._read("SELECT id, ts, kind, window_id, reason FROM events ORDER BY id")]

    # ---- counters and spend
    def bump(self, name: str, by: int = 1) -> None:
        self._write("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    (name, by))

    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._read("SELECT name, value FROM counters")}

    def set_spend(self, stage: str, usd: float) -> None:
        self._write("INSERT OR REPLACE INTO spend VALUES (?, ?, ?)", (stage, float(usd), self.clock()))

    def spend(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._read("SELECT stage, usd FROM spend")}

    def spend_total(self) -> float:
        return sum(self.spend().values())


def open_existing(path: Path) -> MonitorStore | None:
    """The store when the file exists (a reader never creates one), else None."""
    return MonitorStore(path) if Path(path).exists() else None
