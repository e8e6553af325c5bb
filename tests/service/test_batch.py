import json
import sqlite3

import pytest
from pydantic import BaseModel

from llamaduo.errors import UserError
from llamaduo.service import BudgetExceeded, ServiceClient
from tests.conftest import overlap_judge, service_config


class Score(BaseModel):
    score: int
    reason: str


class JudgeReply(BaseModel):
    similarity: Score
    precision: Score


def judge_request(i: int, candidate: str = "the cat sat") -> tuple:
    msgs = [{"role": "user", "content": f"<reference>\nthe cat sat on the mat\n</reference>\n<candidate>\n{candidate} {i}\n</candidate>"}]
    return (msgs, JudgeReply, {"sample_index": i})


def client_for(svc, tmp_path, sleeps=None, **kw):
    async def fake_sleep(s: float) -> None:
        if sleeps is not None:
            sleeps.append(s)

    return ServiceClient(service_config(svc, **kw), db_path=tmp_path / "s.sqlite", sleep=fake_sleep)


def batch(client, reqs, **kw):
    return client.run_batch(reqs, model="fake-model", temperature=0.7, max_tokens=64, stage="judge", round=1, **kw)


def uploaded_lines(svc) -> list[list[dict]]:
    """The JSONL files uploaded for batches, one list of lines per batch."""
    out = []
    for b in svc.batches.values():
        data = svc.files[b["object"]["input_file_id"]].decode()
        out.append([json.loads(line) for line in data.splitlines() if line.strip()])
    return out


def calls(db, *cols):
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT {','.join(cols)} FROM calls ORDER BY id").fetchall()
    finally:
        conn.close()


def test_batch_of_judge_requests_returns_parsed_replies_in_input_order(fake_service, tmp_path):
    fake_service.responder = overlap_judge
    client = client_for(fake_service, tmp_path)
    reqs = [judge_request(i, cand) for i, cand in enumerate(["the cat sat on the mat", "a dog", "the cat", "mat"])]
    replies = batch(client, reqs)
    expected = [JudgeReply.model_validate_json(overlap_judge({"messages": r[0]})) for r in reqs]
    assert [r.parsed for r in replies] == expected
    assert all(r.ok and not r.cached for r in replies)
    assert replies[0].parsed.similarity.score > replies[1].parsed.similarity.score
    paths = [r["path"].rstrip("/") for r in fake_service.requests]
    assert paths[0].endswith("/files") and paths[1].endswith("/batches")
    assert not any(p.endswith("/chat/completions") for p in paths)  # nothing sent one by one
    [lines] = uploaded_lines(fake_service)
    assert len(lines) == 4 and all(line["url"] == "/v1/chat/completions" for line in lines)
    assert [line["custom_id"] for line in lines] == [r.extra["request_hash"] for r in replies]
    assert fake_service.requests[0]["body"]["purpose"] == "batch"
    stages = calls(tmp_path / "s.sqlite", "stage", "round", "status", "sample_index")
    assert stages == [("judge", 1, "ok", i) for i in range(4)]


def test_cached_requests_are_left_out_of_the_uploaded_file(fake_service, tmp_path):
    fake_service.responder = overlap_judge
    client = client_for(fake_service, tmp_path)
    reqs = [judge_request(i) for i in range(4)]
    # Two answered by normal calls first: their cache entries must serve the batch.
    normal = client.run(
        [client.chat_json(m, s, model="fake-model", temperature=0.7, max_tokens=64, sample_index=meta["sample_index"])
         for m, s, meta in reqs[:2]]
    )
    assert all(r.ok for r in normal)
    replies = batch(client, reqs)
    assert [r.cached for r in replies] == [True, True, False, False]
    assert [r.parsed for r in replies[:2]] == [r.parsed for r in normal]
    [lines] = uploaded_lines(fake_service)
    assert [line["body"]["messages"] for line in lines] == [reqs[2][0], reqs[3][0]]


def test_rerun_sends_no_new_batch_and_normal_calls_replay_batch_results(fake_service, tmp_path):
    fake_service.responder = overlap_judge
    client = client_for(fake_service, tmp_path)
    reqs = [judge_request(i) for i in range(3)]
    first = batch(client, reqs)
    sent = fake_service.count
    again = batch(client, reqs)
    assert fake_service.count == sent and len(fake_service.batches) == 1
    assert all(r.cached for r in again) and [r.parsed for r in again] == [r.parsed for r in first]
    m, s, meta = reqs[1]
    [normal] = client.run([client.chat_json(m, s, model="fake-model", temperature=0.7, max_tokens=64,
                                            sample_index=meta["sample_index"])])
    assert normal.cached and normal.parsed == first[1].parsed and fake_service.count == sent


def test_invalid_json_line_is_a_failed_reply_with_raw_text_and_is_not_cached(fake_service, tmp_path):
    def responder(req):
        text = req["messages"][0]["content"]
        return "sorry, I cannot judge this" if "candidate 1" in text else overlap_judge(req)

    fake_service.responder = responder
    client = client_for(fake_service, tmp_path)
    reqs = [judge_request(i, "candidate") for i in range(3)]
    replies = batch(client, reqs)
    assert [r.ok for r in replies] == [True, False, True]
    bad = replies[1]
    assert bad.parsed is None and bad.raw == "sorry, I cannot judge this" and "invalid JSON for JudgeReply" in bad.error
    batch(client, reqs)  # only the failed one goes again, in a second batch, with no repair prompt
    assert [len(lines) for lines in uploaded_lines(fake_service)] == [3, 1]
    assert uploaded_lines(fake_service)[1][0]["body"]["messages"] == reqs[1][0]


def test_cost_is_logged_at_the_batch_discount(fake_service, tmp_path):
    fake_service.responder = lambda req: "plain text answer"
    client = client_for(fake_service, tmp_path, batch_discount=0.5)
    reqs = [([{"role": "user", "content": f"say something {i}"}], None, {"sample_index": 0}) for i in range(2)]
    replies = batch(client, reqs)
    assert [r.raw for r in replies] == ["plain text answer"] * 2 and all(r.parsed is None for r in replies)
    rows = calls(tmp_path / "s.sqlite", "input_tokens", "output_tokens", "cost_usd")
    for (tin, tout, cost), reply in zip(rows, replies, strict=True):
        full = (tin * 1.0 + tout * 2.0) / 1e6  # the fake-model prices in service_config
        assert tin > 0 and tout > 0
        assert cost == pytest.approx(full * 0.5) and reply.cost_usd == pytest.approx(full * 0.5)
    assert client.ledger()["by_stage"]["judge/r01"]["usd"] == pytest.approx(sum(r[2] for r in rows), abs=1e-6)


def test_polling_waits_with_the_injected_sleep(fake_service, tmp_path):
    fake_service.responder = overlap_judge
    fake_service.batch_polls_to_complete = 4
    sleeps: list[float] = []
    client = client_for(fake_service, tmp_path, sleeps=sleeps)
    replies = batch(client, [judge_request(0)], poll_s=30.0)
    assert replies[0].ok
    assert sleeps == [30.0, 30.0, 30.0]  # three in_progress polls, then completed; no real waiting
    polls = [r for r in fake_service.requests if "/batches/" in r["path"]]
    assert len(polls) == 4


def test_batch_not_done_by_the_timeout_is_cancelled_and_its_requests_fail(fake_service, tmp_path):
    fake_service.responder = overlap_judge
    fake_service.batch_polls_to_complete = 100
    now = [0.0]

    async def sleep(s: float) -> None:
        now[0] += s

    client = ServiceClient(service_config(fake_service), db_path=tmp_path / "s.sqlite", sleep=sleep, clock=lambda: now[0])
    replies = batch(client, [judge_request(0), judge_request(1)], poll_s=60.0, timeout_s=300.0)
    assert not any(r.ok for r in replies) and "cancelled" in replies[0].error
    assert [b["object"]["status"] for b in fake_service.batches.values()] == ["cancelled"]
    assert [s for (s,) in calls(tmp_path / "s.sqlite", "status")] == ["failed", "failed"]


def test_anthropic_provider_is_refused_with_a_clear_error(fake_service, tmp_path):
    client = ServiceClient(service_config(fake_service, provider="anthropic"), db_path=tmp_path / "s.sqlite")
    with pytest.raises(UserError, match="Anthropic Message Batches are not wired yet"):
        batch(client, [judge_request(0)])
    assert fake_service.count == 0


def test_spent_budget_stops_a_batch_before_it_is_submitted(fake_service, tmp_path):
    fake_service.responder = overlap_judge
    client = client_for(fake_service, tmp_path, max_usd=1e-9)
    assert all(r.ok for r in batch(client, [judge_request(0)]))  # nothing spent yet: it goes
    sent = fake_service.count
    with pytest.raises(BudgetExceeded):
        batch(client, [judge_request(1)])
    assert fake_service.count == sent and len(fake_service.batches) == 1


def counting(responder):
    """The responder, counting each request line it answers."""
    seen: list[str] = []

    def answer(req):
        seen.append(req["messages"][0]["content"])
        return responder(req)

    return answer, seen


def test_split_cuts_consecutive_hash_runs_by_count_and_by_bytes():
    from llamaduo.service.batch import split

    lines = {f"h{i}": b"x" * (10 if i != 5 else 40) for i in range(8)}
    hashes = sorted(lines)
    assert split(hashes, lines, max_requests=3, max_bytes=10_000) == [hashes[0:3], hashes[3:6], hashes[6:8]]
    by_bytes = split(hashes, lines, max_requests=100, max_bytes=30)
    assert by_bytes == [["h0", "h1", "h2"], ["h3", "h4", "h6"], ["h7"]]
    assert [c for c in by_bytes if "h5" in c] == []  # 40 bytes: no batch can carry it
    assert all(sum(len(lines[h]) for h in c) <= 30 for c in by_bytes) and sum(map(len, by_bytes)) == 7
    assert [h for c in by_bytes for h in c] == [h for h in hashes if h != "h5"]  # in order, each once


def test_a_job_over_the_request_limit_runs_as_several_recorded_batches(fake_service, tmp_path):
    fake_service.responder, seen = counting(overlap_judge)
    fake_service.batch_max_requests = 3  # the simulator refuses a larger batch, as the provider would
    client = client_for(fake_service, tmp_path, batch_max_requests=3)
    reqs = [judge_request(i) for i in range(8)]
    replies = batch(client, reqs)
    assert all(r.ok for r in replies) and len(seen) == 8
    assert [len(lines) for lines in uploaded_lines(fake_service)] == [3, 3, 2]
    assert len({r.extra["batch_id"] for r in replies}) == 3
    records = client.log.batches()
    assert [b.requests for b in records] == [3, 3, 2] and all(b.status == "completed" and b.done_ts for b in records)
    ranges = [(b.first_hash, b.last_hash) for b in records]
    assert sorted(r.extra["request_hash"] for r in replies) == sorted(
        line["custom_id"] for lines in uploaded_lines(fake_service) for line in lines)
    assert all(a[1] < b[0] for a, b in zip(sorted(ranges)[:-1], sorted(ranges)[1:], strict=True))  # disjoint hash ranges


def test_a_job_over_the_byte_limit_is_split_by_bytes(fake_service, tmp_path):
    fake_service.responder = overlap_judge
    reqs = [judge_request(i) for i in range(6)]
    one = len(json.dumps({"custom_id": "0" * 64, "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "fake-model", "messages": reqs[0][0], "temperature": 0.7, "max_tokens": 64,
        "response_format": {"type": "json_object"}}})) + 1
    limit = 2 * one + 5  # two lines fit, three do not
    fake_service.batch_max_bytes = limit
    client = client_for(fake_service, tmp_path, batch_max_bytes=limit)
    replies = batch(client, reqs)
    assert all(r.ok for r in replies)
    assert [len(lines) for lines in uploaded_lines(fake_service)] == [2, 2, 2]
    assert all(b.bytes <= limit for b in client.log.batches())


def test_a_request_no_batch_can_carry_fails_alone(fake_service, tmp_path):
    fake_service.responder = overlap_judge
    client = client_for(fake_service, tmp_path, batch_max_bytes=600)
    reqs = [judge_request(0), judge_request(1, "x" * 1000)]
    ok, big = batch(client, reqs)
    assert ok.ok and not big.ok and "over service.batch_max_bytes" in big.error
    assert [len(lines) for lines in uploaded_lines(fake_service)] == [1]


def test_a_run_that_died_after_two_of_three_batches_resumes_them_and_submits_only_the_third(fake_service, tmp_path):
    fake_service.responder, seen = counting(overlap_judge)
    fake_service.batch_polls_to_complete = 2
    reqs = [judge_request(i) for i in range(7)]
    client = client_for(fake_service, tmp_path, batch_max_requests=3)
    submitted = []

    def die_after_the_second(record):
        submitted.append(record.batch_id)
        if len(submitted) == 2:
            raise KeyboardInterrupt("the process dies here")

    client.on_batch_submitted = die_after_the_second
    with pytest.raises(KeyboardInterrupt):
        batch(client, reqs)
    assert len(fake_service.batches) == 2 and seen == []
    client.close()

    rerun = client_for(fake_service, tmp_path, batch_max_requests=3)  # a new process, the same call log
    replies = batch(rerun, reqs)
    assert len(fake_service.batches) == 3  # the two recorded ones re-attached, one new
    assert all(r.ok for r in replies)
    assert sorted(seen) == sorted(m[0]["content"] for m, _, _ in reqs)  # every request answered once
    assert {r.extra["batch_id"] for r in replies} == set(fake_service.batches)
    assert [b.batch_id for b in rerun.log.batches()][:2] == submitted
    assert all(b.done_ts for b in rerun.log.batches()) and rerun.log.open_batches("fake-model") == []
    again = batch(rerun, reqs)
    assert all(r.cached for r in again) and len(fake_service.batches) == 3


def test_several_batches_are_priced_at_the_batch_discount_and_cached_per_request(fake_service, tmp_path):
    fake_service.responder = lambda req: "plain text answer"
    client = client_for(fake_service, tmp_path, batch_discount=0.5, batch_max_requests=2)
    reqs = [([{"role": "user", "content": f"say something {i}"}], None, {"sample_index": 0}) for i in range(5)]
    replies = batch(client, reqs)
    assert len(fake_service.batches) == 3
    for reply in replies:
        full = (reply.input_tokens * 1.0 + reply.output_tokens * 2.0) / 1e6
        assert reply.cost_usd == pytest.approx(full * 0.5) and reply.cost_usd > 0
    assert client.ledger()["total"]["usd"] == pytest.approx(sum(r.cost_usd for r in replies), abs=1e-6)
    for m, _, _meta in reqs:  # each request's answer replays alone, for a normal call
        [normal] = client.run([client.chat_text(m, model="fake-model", temperature=0.7, max_tokens=64)])
        assert normal.cached and normal.raw == "plain text answer"
