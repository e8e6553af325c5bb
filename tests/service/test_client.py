"""The call path against a real loopback server: retries, repair calls, cache, budget, pacing, call log."""

import asyncio
import os
import time

import pytest
from pydantic import BaseModel, field_validator

from llamaduo.demo.simulator import Fault
from llamaduo.service import BudgetExceeded, ServiceClient
from llamaduo.service.ledger import cache_stats
from tests.conftest import service_config
from tests.service.conftest import GOOD, Verdict, ask, rows


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
    from llamaduo.demo.simulator import SimulatedService

    with SimulatedService(lambda req: GOOD, latency_s=0.1) as svc:
        db = tmp_path / "s.sqlite"
        client = ServiceClient(service_config(svc, max_usd=1e-6, concurrency=4), db_path=db)
        with pytest.raises(BudgetExceeded):
            ask(client, n=20)
        sent = [r for r in rows(db) if r[0] == "ok"]
        assert 1 <= svc.count <= 4 and len(sent) == svc.count


def test_concurrency_cap_is_respected(tmp_path):
    from llamaduo.demo.simulator import SimulatedService

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


def test_a_bug_in_our_own_code_raises_at_once_and_is_not_retried(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    client = ServiceClient(service_config(fake_service, max_retries=3), db_path=tmp_path / "s.sqlite")
    calls = []

    async def broken_send(sdk, model, messages, params):
        calls.append(model)
        raise ValueError("a bug on our side, not the provider's")

    client.provider.send = broken_send
    with pytest.raises(ValueError, match="a bug on our side"):
        ask(client)
    assert len(calls) == 1 and fake_service.count == 0
    assert rows(tmp_path / "s.sqlite") == []  # not logged as a provider failure either


def test_a_bug_in_a_schema_validator_raises_and_is_not_repaired(fake_service, tmp_path):
    class Buggy(BaseModel):
        score: int

        @field_validator("score")
        @classmethod
        def _check(cls, v: int) -> int:
            return {"expected": v}["missing"]  # KeyError: our bug, not a bad reply

    fake_service.responder = lambda req: GOOD
    client = ServiceClient(service_config(fake_service, json_retries=2), db_path=tmp_path / "s.sqlite")
    with pytest.raises(KeyError):
        client.run([client.chat_json([{"role": "user", "content": "x"}], Buggy)])
    assert fake_service.count == 1
    assert [(r[0], r[3]) for r in rows(tmp_path / "s.sqlite")] == [("ok", GOOD)]  # the paid call is still in the log


def test_run_reports_the_total_and_each_completion_to_the_progress_reporter(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    client = ServiceClient(service_config(fake_service), db_path=tmp_path / "s.sqlite")
    seen = []

    class Reporter:
        def start(self, total: int) -> None:
            seen.append(("start", total))

        def advance(self) -> None:
            seen.append("advance")

        def stop(self) -> None:
            seen.append("stop")

    msgs = [{"role": "user", "content": "judge this"}]
    replies = client.run([client.chat_json(msgs, Verdict, sample_index=i) for i in range(3)], progress=Reporter())
    assert all(r.ok for r in replies)
    assert seen == [("start", 3), "advance", "advance", "advance", "stop"]


def test_cache_keys_are_those_earlier_releases_wrote(tmp_path):
    """Golden hashes from the single-module client: existing service.sqlite caches keep matching."""
    from llamaduo.config import ServiceConfig

    msgs = [{"role": "user", "content": "judge this"}]
    golden = {
        ("openai", "json_object"): "a26acc0073b0f24f5aa65af7d1d6733e31ba0adf7a7212f20aa1dc9fc573b477",
        ("openai", "json_schema"): "e3ef6be4c22bcc42e65597bebe999dea967021fa174d6e2e12963eca79c6e1a1",
        ("anthropic", "json_object"): "7a349351f827c8cc5176bae9fa32357d6a969cb92721089db146518fb7d2c94d",
    }
    for (provider, mode), expected in golden.items():
        client = ServiceClient(ServiceConfig(provider=provider, model="gpt-4o-mini", structured_output=mode))
        assert client.request_hash("gpt-4o-mini", msgs, client.params(0.7, 512, Verdict), 3) == expected
    text = ServiceClient(ServiceConfig())
    assert text.request_hash("gpt-4o-mini", msgs, text.params(0.7, 512, None), 3) == (
        "5521cc10a0787e7910d7dde78174bf2fef70750d8d941debed00cba729b0883b"
    )


def test_an_isolated_429_delays_only_its_own_retry(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    fake_service.inject(Fault.rate_limit(0.2))  # Retry-After, but no rate limit said to be spent
    client = ServiceClient(service_config(fake_service, concurrency=4), db_path=tmp_path / "s.sqlite")
    replies = ask(client, n=4)
    assert all(r.ok for r in replies) and sorted(r.attempts for r in replies) == [1, 1, 1, 2]
    assert client.pacer.not_before == float("-inf")  # nobody else was held


def test_a_429_that_says_the_limit_is_spent_holds_every_worker(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    fake_service.inject(Fault("rate_limit", 429, headers={"Retry-After": "0.2", "x-ratelimit-remaining-requests": "0"}))
    client = ServiceClient(service_config(fake_service), db_path=tmp_path / "s.sqlite")
    t0 = time.monotonic()
    [reply] = ask(client)
    assert reply.ok and client.pacer.not_before > t0


def test_three_429s_in_a_row_hold_every_worker_even_without_limit_headers(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    fake_service.inject(*[Fault.rate_limit(0.05)] * 3)
    client = ServiceClient(service_config(fake_service, concurrency=1), db_path=tmp_path / "s.sqlite")
    t0 = time.monotonic()
    [reply] = ask(client)
    assert reply.ok and reply.attempts == 4 and client.pacer.not_before > t0


def test_token_pacing_books_prompt_and_max_tokens_and_spaces_a_mixed_stage(tmp_path):
    from llamaduo.demo.simulator import SimulatedService

    with SimulatedService(lambda req: "fine", rpm_limit=1200, tpm_limit=60_000) as svc:
        client = ServiceClient(service_config(svc, rpm=1200, tpm=60_000, concurrency=8), db_path=tmp_path / "s.sqlite")
        msgs = [{"role": "user", "content": "say something"}]
        sizes = [8, 400] * 10
        t0 = time.monotonic()
        replies = client.run([client.chat_text(msgs, max_tokens=m, sample_index=i) for i, m in enumerate(sizes)])
        elapsed = time.monotonic() - t0
        stats = svc.stats()
    assert all(r.ok for r in replies) and stats["limited_rpm"] == stats["limited_tpm"] == 0
    weights = sum(m + 12 for m in sizes)  # each prompt counts 12 tokens, plus its max_tokens
    assert elapsed >= (weights - 600) / (0.98 * 1000) - 0.2  # the burst, then 98 % of 1,000 tokens/s
    assert client.pacer.waits["tokens"] > 0


def test_a_resumed_stage_sends_only_the_calls_it_had_not_finished(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    db = tmp_path / "s.sqlite"
    ask(ServiceClient(service_config(fake_service), db_path=db), n=30)  # the part done before the stop
    again = ask(ServiceClient(service_config(fake_service), db_path=db), n=50)
    assert fake_service.count == 50 and sum(r.cached for r in again) == 30 and all(r.ok for r in again)


def test_a_good_reply_is_stored_once_and_an_unusable_one_stays_with_its_call(fake_service, tmp_path):
    import sqlite3

    fake_service.responder = lambda req: GOOD
    fake_service.inject(Fault.bad_content("not json at all"))
    db = tmp_path / "s.sqlite"
    [reply] = ask(ServiceClient(service_config(fake_service), db_path=db))
    assert reply.ok
    conn = sqlite3.connect(db)
    assert [r for (r,) in conn.execute("SELECT raw_reply FROM calls ORDER BY id")] == ["not json at all", None]
    assert [r for (r,) in conn.execute("SELECT raw_reply FROM call_replies ORDER BY id")] == ["not json at all", GOOD]
    assert [r for (r,) in conn.execute("SELECT raw_reply FROM cache")] == [GOOD, GOOD]  # the repaired answer under both keys
    conn.close()
