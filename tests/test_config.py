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


@pytest.mark.parametrize(
    "override,expected",
    [
        ("judge.pass_rule.threshold=150", "less than or equal to 100"),
        ("judge.pass_rule.threshold=0", "below the mean score's range 1-100"),
        ("train.epochs=.inf", "finite number"),
        ("judge.min_valid=.nan", "finite number"),
        ("service.base_url=not a url", "http(s) URL"),
        ("service.api_key_env=my key", "environment-variable name"),
    ],
)
def test_nonsense_settings_are_refused_and_blamed_on_set(override, expected):
    with pytest.raises(ConfigError) as e:
        from_dict({}, [override])
    assert str(e.value).startswith("--set " + override.split("=")[0]) and expected in str(e.value)


def test_a_coverage_threshold_may_be_zero_but_a_file_error_names_the_file():
    assert from_dict({"judge": {"pass_rule": {"statistic": "coverage@50", "threshold": 0}}}).judge.pass_rule.threshold == 0
    with pytest.raises(ConfigError, match=r"^c.yaml: judge.pass_rule.threshold"):
        from_dict({"judge": {"pass_rule": {"threshold": 101}}}, ["train.epochs=2"], source="c.yaml")


@pytest.mark.parametrize("value", ["sk-proj-abcdefghijklmnopqrstuvwx", "AKIAIOSFODNN7EXAMPLE", "ghp_abcdefghij0123456789abcdefghij"])
def test_a_key_pasted_as_api_key_env_is_refused_without_being_echoed(value):
    for field in ("service.api_key_env", "serve.api_key_env"):
        with pytest.raises(ConfigError) as e:
            from_dict({}, [f"{field}={value}"])
        assert "looks like a key" in str(e.value) and value not in str(e.value)
