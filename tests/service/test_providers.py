"""What each provider puts on the wire: OpenAI response formats, Anthropic's system field."""

import json

from pydantic import BaseModel

from llamaduo.demo.simulator import Fault
from llamaduo.service import ServiceClient, strict_schema
from tests.conftest import service_config
from tests.service.conftest import GOOD, Verdict, ask, rows


def test_json_schema_mode_sends_a_strict_schema(fake_service, tmp_path):
    class Pair(BaseModel):
        instruction: str
        response: str = ""

    class Pairs(BaseModel):
        contents: list[Pair]

    fake_service.responder = lambda req: json.dumps({"contents": [{"instruction": "a", "response": "b"}]})
    client = ServiceClient(service_config(fake_service, structured_output="json_schema"), db_path=tmp_path / "s.sqlite")
    [reply] = client.run([client.chat_json([{"role": "user", "content": "x"}], Pairs)])
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


def test_anthropic_provider_sends_system_separately_and_shares_the_call_log(fake_service, tmp_path):
    fake_service.responder = lambda req: GOOD
    fake_service.inject(Fault.server_error(529))
    cfg = service_config(fake_service, provider="anthropic", base_url=fake_service.base_url.removesuffix("/v1"))
    client = ServiceClient(cfg, db_path=tmp_path / "s.sqlite")
    msgs = [{"role": "system", "content": "You are a judge."}, {"role": "user", "content": "judge this"}]
    [reply] = client.run([client.chat_json(msgs, Verdict, stage="judge")])
    body = fake_service.requests[-1]["body"]
    assert fake_service.requests[-1]["path"] == "/v1/messages"
    assert reply.ok and reply.parsed.score == 7 and reply.cost_usd > 0
    assert body["system"] == "You are a judge." and [m["role"] for m in body["messages"]] == ["user"]
    assert [r[0] for r in rows(tmp_path / "s.sqlite")] == ["http_529", "ok"]
