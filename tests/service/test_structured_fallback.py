"""OpenAI-compatible servers that are not OpenAI (llama.cpp's): json_object with a schema, the automatic
switch from json_schema when the server refuses it, full error bodies, invalid requests not retried."""

from __future__ import annotations

import pytest

from llamaduo.demo.simulator import ErrorReply
from llamaduo.service import ServiceClient, strict_schema
from tests.conftest import service_config
from tests.service.conftest import GOOD, Verdict, ask, rows

# What llama-cpp-python's server says (as a 500) when response_format.type is json_schema.
LLAMA_CPP_REFUSAL = (
    "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n  Input should be 'text' or "
    "'json_object' [type=literal_error, input_value='json_schema', input_type=str]"
)


def llama_cpp_like(status: int):
    """Refuses json_schema; with json_object answers JSON only when a schema constrains it."""

    def respond(req: dict):
        fmt = req.get("response_format") or {}
        if fmt.get("type") == "json_schema":
            return ErrorReply(status, LLAMA_CPP_REFUSAL)
        return GOOD if fmt.get("type") == "json_object" and "schema" in fmt else "Sure, here is my verdict: fine."

    return respond


def test_json_object_schema_mode_sends_the_schema_inside_json_object(fake_service, tmp_path):
    fake_service.responder = llama_cpp_like(500)
    client = ServiceClient(service_config(fake_service, structured_output="json_object_schema"), db_path=tmp_path / "s.sqlite")
    [reply] = ask(client)
    assert reply.ok and reply.parsed.score == 7
    assert fake_service.requests[0]["body"]["response_format"] == {"type": "json_object", "schema": strict_schema(Verdict)}


@pytest.mark.parametrize("status", [400, 500])
def test_json_schema_switches_to_json_object_with_a_schema_when_the_server_refuses_it(fake_service, tmp_path, status):
    fake_service.responder = llama_cpp_like(status)
    client = ServiceClient(service_config(fake_service, structured_output="json_schema", concurrency=1),
                           db_path=tmp_path / "s.sqlite")
    replies = ask(client, n=3)
    assert all(r.ok and r.parsed.score == 7 for r in replies)
    formats = [req["body"]["response_format"]["type"] for req in fake_service.requests]
    assert formats == ["json_schema", "json_object", "json_object", "json_object"]  # refused once, then switched
    log = rows(tmp_path / "s.sqlite")
    refused = [r for r in log if r[0] == "unsupported_format"]
    assert len(refused) == 1 and refused[0][1] == status
    assert "input_value='json_schema'" in refused[0][4]  # the full error body, not "1 validation error for …"


def test_a_request_the_server_calls_invalid_is_not_retried_and_its_body_is_logged(fake_service, tmp_path):
    fake_service.responder = lambda req: ErrorReply(500, LLAMA_CPP_REFUSAL.replace("json_schema", "xml"))
    client = ServiceClient(service_config(fake_service, structured_output="json_object", max_retries=3),
                           db_path=tmp_path / "s.sqlite")
    [reply] = ask(client)
    assert not reply.ok and fake_service.count == 1  # a 500 that says "validation error" is not a server fault
    status, http, _, _, error = rows(tmp_path / "s.sqlite")[0]
    assert status == "invalid_request" and http == 500 and "input_value='xml'" in error
    fake_service.responder = lambda req: ErrorReply(400, "Invalid value for 'temperature': expected a number")
    [reply] = ask(client, sample_offset=1)
    assert not reply.ok and fake_service.count == 2
    assert rows(tmp_path / "s.sqlite")[-2][0] == "client_error"
