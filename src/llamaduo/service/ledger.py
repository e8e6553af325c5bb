"""Reading spend out of the call log: the ledger (what was paid for, per stage and round), the calls
a dead process may have been billed for, and the cache's hits and savings."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def ledger_from_db(conn: sqlite3.Connection) -> dict[str, Any]:
    """Totals overall and per (stage, round), counting only what was paid for. Read from the
    `ledger` table; a file that has not been migrated yet is summed from `calls`."""
    have_ledger = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='ledger'").fetchone()

    def agg(group: str = "") -> list[tuple]:
        sel = f"{group + ',' if group else ''}"
        if have_ledger:
            q = (
                f"SELECT {sel} COALESCE(SUM(paid),0), COALESCE(SUM(cached),0), COALESCE(SUM(failed),0),"
                " COALESCE(SUM(input_tokens),0), COALESCE(SUM(output_tokens),0),"
                " COALESCE(SUM(cost_usd),0), COALESCE(SUM(saved_usd),0) FROM ledger"
            )
        else:
            q = (
                f"SELECT {sel} COUNT(*) FILTER (WHERE status!='cached'), COUNT(*) FILTER (WHERE status='cached'),"
                " COUNT(*) FILTER (WHERE status='failed'),"
                " COALESCE(SUM(CASE WHEN status!='cached' THEN input_tokens END),0),"
                " COALESCE(SUM(CASE WHEN status!='cached' THEN output_tokens END),0),"
                " COALESCE(SUM(cost_usd),0), COALESCE(SUM(saved_usd),0) FROM calls"
            )
        return conn.execute(q + (f" GROUP BY {group} ORDER BY {group}" if group else "")).fetchall()

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
    total["possibly_billed"], total["possibly_billed_usd"] = possibly_billed(conn), possibly_billed_usd(conn)
    return {"total": total, "by_stage": by_stage}


def possibly_billed(conn: sqlite3.Connection) -> int:
    """Attempts sent by a process that died before their reply came back: the provider may bill them."""
    try:
        return int(conn.execute("SELECT COUNT(*) FROM sent WHERE answered=0 AND pid!=?", (os.getpid(),)).fetchone()[0])
    except sqlite3.OperationalError:  # a call log from before step 3 (read without migrating)
        return 0


def possibly_billed_usd(conn: sqlite3.Connection) -> float:
    """The most those attempts may have cost (their prompt and max_tokens, priced); the budget counts it."""
    try:
        row = conn.execute("SELECT COALESCE(SUM(est_usd),0) FROM sent WHERE answered=0 AND pid!=?", (os.getpid(),))
        return round(float(row.fetchone()[0]), 6)
    except sqlite3.OperationalError:  # a call log from before step 4 (read without migrating)
        return 0.0


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
