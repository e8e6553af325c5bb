import json
import time

import httpx

from llamaduo.demo.simulator import Fault, SimulatedService


def post(svc, body=None, timeout=5.0):
    return httpx.post(svc.base_url + "/chat/completions", json=body or {"model": "m", "messages": []}, timeout=timeout)


def test_answers_from_the_responder_and_records_requests(fake_service):
    fake_service.responder = lambda req: "echo " + req["messages"][0]["content"]
    r = post(fake_service, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "echo hi"
    assert r.json()["usage"]["completion_tokens"] > 0
    assert fake_service.count == 1 and fake_service.requests[0]["body"]["messages"][0]["content"] == "hi"


def test_rate_limit_fault_sends_429_with_retry_after(fake_service):
    fake_service.inject(Fault.rate_limit(2.5))
    r = post(fake_service)
    assert r.status_code == 429 and r.headers["retry-after"] == "2.5"
    assert post(fake_service).status_code == 200  # consumed once


def test_server_error_fault(fake_service):
    fake_service.inject(Fault.server_error(503))
    assert post(fake_service).status_code == 503


def test_timeout_fault_really_delays(fake_service):
    fake_service.inject(Fault.timeout(0.6))
    t0 = time.monotonic()
    assert post(fake_service).status_code == 200
    assert time.monotonic() - t0 >= 0.6


def test_malformed_fault_body_is_not_json(fake_service):
    fake_service.inject(Fault.malformed())
    r = post(fake_service)
    try:
        json.loads(r.text)
        parsed = True
    except json.JSONDecodeError:
        parsed = False
    assert not parsed


def test_truncated_json_fault_returns_truncated_content(fake_service):
    fake_service.inject(Fault.truncated_json())
    content = post(fake_service).json()["choices"][0]["message"]["content"]
    assert content.startswith("{") and not content.endswith("}")


def test_rpm_limit_answers_429_above_the_limit():
    with SimulatedService(lambda req: "ok", rpm_limit=3) as svc:
        codes = [post(svc).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        assert svc.count == 5


def test_binds_loopback_only(fake_service):
    assert fake_service.base_url.startswith("http://127.0.0.1:")
