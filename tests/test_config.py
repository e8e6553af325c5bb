"""The config schema: every field described, `--set` overrides validated, no secrets in a dump."""

import pytest
import yaml

from llamaduo.config import Config, ConfigError, dump_config, from_dict


def test_every_field_has_a_description():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(Config)


def test_set_overrides_are_typed_and_validated():
    cfg = from_dict({}, ["train.epochs=2", "infer.stop=['</s>']", "service.model=gpt-4o"])
    assert cfg.train.epochs == 2.0 and cfg.infer.stop == ["</s>"] and cfg.service.model == "gpt-4o"
    with pytest.raises(ConfigError, match="train.learning_rate"):
        from_dict({}, ["train.learning_rate=-1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        from_dict({}, ["train.epochs"])


def test_dumped_config_holds_env_var_names_not_secrets(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-canary-config-0000")
    text = dump_config(Config())
    assert "sk-canary" not in text
    assert yaml.safe_load(text)["service"]["api_key_env"] == "OPENAI_API_KEY"
