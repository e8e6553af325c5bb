"""Keys are checked before anything runs, and only their variable's name is ever stored."""

import json

import pytest

from llamaduo import loop
from llamaduo.config import from_dict
from llamaduo.service import ServiceError
from llamaduo.service.keys import api_key


def test_a_missing_key_stops_run_before_anything_is_trained_or_paid_for(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMADUO_UNSET_KEY", raising=False)
    cov = tmp_path / "c.jsonl"
    cov.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a"}) + "\n" for i in range(10)))
    cfg = from_dict({"runs_dir": str(tmp_path / "runs"), "data": {"input": str(cov)},
                     "service": {"base_url": "https://api.example.com/v1", "api_key_env": "LLAMADUO_UNSET_KEY"}})
    with pytest.raises(ServiceError, match="LLAMADUO_UNSET_KEY is not set"):
        loop.run(cfg, display="quiet")
    assert not (cfg.run_dir / "rounds").exists() and not (cfg.run_dir / "service.sqlite").exists()


def test_the_key_comes_from_its_variable_and_loopback_servers_need_none(monkeypatch):
    monkeypatch.setenv("LLAMADUO_SOME_KEY", "sk-test-value")
    cfg = from_dict({"service": {"api_key_env": "LLAMADUO_SOME_KEY"}}).service
    assert api_key(cfg) == "sk-test-value"
    monkeypatch.delenv("LLAMADUO_SOME_KEY")
    local = from_dict({"service": {"api_key_env": "LLAMADUO_SOME_KEY", "base_url": "http://127.0.0.1:9/v1"}}).service
    assert api_key(local) == "not-needed"
