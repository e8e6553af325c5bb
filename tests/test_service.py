import asyncio
import json
import os
import sqlite3
import time

import pytest
from pydantic import BaseModel

from llamaduo.calllog import cache_stats
from llamaduo.service import BudgetExceeded, ServiceClient, extract_json, strict_schema
from llamaduo.simulator import Fault
from tests.conftest import service_config


class Verdict(BaseModel):
    score: int
    reason: str


GOOD = json.dumps({"score": 7, "reason": "fine"})


def ask(client, n=1, sample_offset=0, **kw):
    msgs = [{"role": "user", "content": "judge this"}]
    coros = [client.chat_json(msgs, Verdict, sample_index=i + sample_offset, stage="judge", round=0, **kw) for i in range(n)]
    return client.run(coros, progress=False)


def rows(db):
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT status, http_status, request_hash, raw_reply, error FROM calls ORDER BY id").fetchall()
    finally:
        conn.close()


def test_429_with_retry_after_is_waited_out(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    fake_service.inject(Fault.rate_limit(0.4))
    client = ServiceClient(service_config(fake_service), db_path=tmp_path / "s.sqlite")
    t0 = time.monotonic()
    [reply] = ask(client)
    assert reply.ok and reply.parsed.score == 7 and reply.attempts == 2
    assert time.monotonic() - t0 >= 0.4
    assert [r[0] for r in rows(tmp_path / "s.sqlite")] == ["http_429", "ok"]


@pytest.mark.parametrize("fault", [Fault.server_error(500), Fault.server_error(503), Fault.timeout(3.0)])
def test_server_errors_and_timeouts_are_retried(fake_service, tmp_path, fault):
    fake_service.responder = lambda req: GOOD
    fake_service.inject(fault)
    client = ServiceClient(service_config(fake_service, timeout_s=1.0), db_path=tmp_path / "s.sqlite")
    [reply] = ask(client)
    assert reply.ok and reply.attempts == 2


def test_exhausted_retries_are_recorded_as_failed_without_raising(fake_service, tmp_path):
    fake_service.inject(*[Fault.server_error(500)] * 10)
    client = ServiceClient(service_config(fake_service, max_retries=2), db_path=tmp_path / "s.sqlite")
    [reply] = ask(client)
    assert not reply.ok and "500" in reply.error
    statuses = [r[0] for r in rows(tmp_path / "s.sqlite")]
    assert statuses == ["http_500", "http_500", "http_500", "failed"]


def test_malformed_json_gets_a_repair_retry(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    fake_service.inject(Fault.truncated_json())
    client = ServiceClient(service_config(fake_service), db_path=tmp_path / "s.sqlite")
    [reply] = ask(client)
    assert reply.ok and reply.parsed.reason == "fine"
    repair = fake_service.requests[1]["body"]["messages"]
    assert repair[-1]["role"] == "user" and "not valid JSON" in repair[-1]["content"]


def test_malformed_http_body_is_retried(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    fake_service.inject(Fault.malformed())
    client = ServiceClient(service_config(fake_service), db_path=tmp_path / "s.sqlite")
    [reply] = ask(client)
    assert reply.ok


def test_unrepairable_reply_is_failed_with_raw_text_kept(fake_service, tmp_path):
    fake_service.responder = lambda req: "I would rate it a seven."
    client = ServiceClient(service_config(fake_service, json_retries=1), db_path=tmp_path / "s.sqlite")
    [reply] = ask(client)
    assert not reply.ok and reply.raw == "I would rate it a seven." and "invalid JSON" in reply.error
    assert fake_service.count == 2


def test_fenced_and_prose_wrapped_json_is_parsed():
    assert extract_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('Sure! {"a": {"b": 2}} hope it helps') == {"a": {"b": 2}}


def test_rerun_with_unchanged_inputs_sends_zero_requests(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    db = tmp_path / "s.sqlite"
    ask(ServiceClient(service_config(fake_service), db_path=db), n=4)
    assert fake_service.count == 4
    again = ask(ServiceClient(service_config(fake_service), db_path=db), n=4)
    assert fake_service.count == 4 and all(r.cached and r.ok for r in again)
    stats = cache_stats(db)
    assert stats["hits"] == 4 and stats["misses"] == 4 and stats["saved_usd"] > 0


def test_sample_index_is_part_of_the_cache_key(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    client = ServiceClient(service_config(fake_service), db_path=tmp_path / "s.sqlite")
    ask(client, n=1)
    ask(client, n=1, sample_offset=1)
    assert fake_service.count == 2


def test_budget_stops_calls_once_spent(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    cfg = service_config(fake_service, max_usd=1e-6, concurrency=1)
    client = ServiceClient(cfg, db_path=tmp_path / "s.sqlite")
    ask(client, n=1)
    with pytest.raises(BudgetExceeded):
        ask(client, n=1, sample_offset=5)
    # A new process sees the same spend from the ledger in SQLite.
    with pytest.raises(BudgetExceeded):
        ask(ServiceClient(cfg, db_path=tmp_path / "s.sqlite"), n=1, sample_offset=9)
    assert fake_service.count == 1


def test_budget_lets_calls_in_flight_finish_and_logs_every_request(tmp_path):
    from llamaduo.simulator import SimulatedService

    with SimulatedService(lambda req: GOOD, latency_s=0.1) as svc:
        db = tmp_path / "s.sqlite"
        client = ServiceClient(service_config(svc, max_usd=1e-6, concurrency=4), db_path=db)
        with pytest.raises(BudgetExceeded):
            ask(client, n=20)
        sent = [r for r in rows(db) if r[0] == "ok"]
        assert 1 <= svc.count <= 4 and len(sent) == svc.count


def test_json_schema_mode_sends_a_strict_schema(fake_service, tmp_path):
    class Pair(BaseModel):
        instruction: str
        response: str = ""

    class Pairs(BaseModel):
        contents: list[Pair]

    fake_service.responder = lambda req: json.dumps({"contents": [{"instruction": "a", "response": "b"}]})
    client = ServiceClient(service_config(fake_service, structured_output="json_schema"), db_path=tmp_path / "s.sqlite")
    [reply] = client.run([client.chat_json([{"role": "user", "content": "x"}], Pairs)], progress=False)
    fmt = fake_service.requests[0]["body"]["response_format"]
    assert reply.ok and fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == strict_schema(Pairs)
    pair = strict_schema(Pairs)["$defs"]["Pair"]
    assert pair["additionalProperties"] is False and pair["required"] == ["instruction", "response"]


def test_json_object_mode_asks_for_a_json_object(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    client = ServiceClient(service_config(fake_service, structured_output="json_object"), db_path=tmp_path / "s.sqlite")
    ask(client)
    assert fake_service.requests[0]["body"]["response_format"] == {"type": "json_object"}


def test_concurrency_cap_is_respected(tmp_path):
    from llamaduo.simulator import SimulatedService

    with SimulatedService(lambda req: GOOD, latency_s=0.1) as svc:
        client = ServiceClient(service_config(svc, concurrency=3), db_path=tmp_path / "s.sqlite")
        ask(client, n=12)
        assert svc.max_in_flight <= 3 and svc.count == 12


def test_rpm_limit_spaces_requests(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    client = ServiceClient(service_config(fake_service, rpm=1200), db_path=tmp_path / "s.sqlite")
    t0 = time.monotonic()
    ask(client, n=24)
    # A burst of 1 % of the limit (12), then 12 more at 98 % of 20/s.
    assert time.monotonic() - t0 >= 12 / 19.6 - 0.02


def test_ledger_totals_per_stage_and_round(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    client = ServiceClient(service_config(fake_service), db_path=tmp_path / "s.sqlite")
    ask(client, n=3)
    ledger = client.ledger()
    assert ledger["total"]["calls"] == 3 and ledger["total"]["usd"] > 0
    assert ledger["by_stage"]["judge/r00"]["calls"] == 3
    assert ledger["unpriced_models"] == []


def test_a_model_without_a_price_costs_zero_and_is_flagged(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    client = ServiceClient(service_config(fake_service, model="mystery-model"), db_path=tmp_path / "s.sqlite")
    [reply] = ask(client)
    assert reply.ok and reply.cost_usd == 0.0 and reply.input_tokens > 0
    assert client.ledger()["unpriced_models"] == ["mystery-model"]


def test_every_request_the_server_received_is_in_the_call_log(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    fake_service.inject(Fault.rate_limit(0.01), Fault.server_error(), Fault.truncated_json())
    client = ServiceClient(service_config(fake_service), db_path=tmp_path / "s.sqlite")
    ask(client, n=3)
    sent = [r for r in rows(tmp_path / "s.sqlite") if r[0] not in ("cached", "failed")]
    assert len(sent) == fake_service.count


def test_canary_key_never_reaches_disk(fake_service, tmp_path, monkeypatch):
    canary = "sk-canary-7f3e9a1b2c"
    monkeypatch.setenv("LLAMADUO_TEST_KEY", canary)
    fake_service.responder = lambda req: GOOD
    fake_service.inject(Fault.server_error(), Fault.rate_limit(0.01))
    client = ServiceClient(service_config(fake_service), db_path=tmp_path / "s.sqlite")
    ask(client, n=2)
    client.close()
    assert fake_service.requests[0]["headers"]["authorization"] == f"Bearer {canary}"  # it was sent...
    for root, _, files in os.walk(tmp_path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert canary.encode() not in fh.read(), f  # ...and never stored


def test_missing_key_for_a_remote_endpoint_is_a_clear_error(tmp_path, monkeypatch):
    from llamaduo.config import ServiceConfig
    from llamaduo.service import ServiceError

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    client = ServiceClient(ServiceConfig(base_url="https://api.example.com/v1", api_key_env="NO_SUCH_KEY_VAR"))

    async def go():
        return await client.chat_json([{"role": "user", "content": "x"}], Verdict)

    with pytest.raises(ServiceError, match="NO_SUCH_KEY_VAR"):
        asyncio.run(go())


def test_a_repaired_reply_is_replayed_from_cache_on_rerun(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    fake_service.inject(Fault.bad_content("not json at all"))
    db = tmp_path / "s.sqlite"
    [first] = ask(ServiceClient(service_config(fake_service), db_path=db))
    assert first.ok and fake_service.count == 2
    [again] = ask(ServiceClient(service_config(fake_service), db_path=db))
    assert again.ok and again.cached and fake_service.count == 2


def test_anthropic_provider_sends_system_separately_and_shares_the_call_log(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    fake_service.inject(Fault.server_error(529))
    cfg = service_config(fake_service, provider="anthropic", base_url=fake_service.base_url.removesuffix("/v1"))
    client = ServiceClient(cfg, db_path=tmp_path / "s.sqlite")
    msgs = [{"role": "system", "content": "You are a judge."}, {"role": "user", "content": "judge this"}]
    [reply] = client.run([client.chat_json(msgs, Verdict, stage="judge")], progress=False)
    body = fake_service.requests[-1]["body"]
    assert fake_service.requests[-1]["path"] == "/v1/messages"
    assert reply.ok and reply.parsed.score == 7 and reply.cost_usd > 0
    assert body["system"] == "You are a judge." and [m["role"] for m in body["messages"]] == ["user"]
    assert [r[0] for r in rows(tmp_path / "s.sqlite")] == ["http_529", "ok"]
