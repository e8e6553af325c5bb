"""Helpers shared by the service client's tests (the fixtures are in tests/conftest.py)."""

from __future__ import annotations

import json
import sqlite3

from pydantic import BaseModel


class Verdict(BaseModel):
    score: int
    reason: str


GOOD = json.dumps({"score": 7, "reason": "fine"})


def ask(client, n=1, sample_offset=0, **kw):
    msgs = [{"role": "user", "content": "judge this"}]
    coros = [client.chat_json(msgs, Verdict, sample_index=i + sample_offset, stage="judge", round=0, **kw) for i in range(n)]
    return client.run(coros)


def rows(db):
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT status, http_status, request_hash, raw_reply, error FROM calls ORDER BY id").fetchall()
    finally:
        conn.close()
