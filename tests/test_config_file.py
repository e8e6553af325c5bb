"""llamaduo.yaml files: every shipped one loads, the example round-trips, errors name file and line."""

from pathlib import Path

import pytest

from llamaduo.config import Config, ConfigError
from llamaduo.config_file import example_yaml, load_config

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_YAML = sorted((ROOT / "examples" / "accelerate").glob("*.yaml"))
SHIPPED_YAML = sorted(
    p for p in ROOT.rglob("*.yaml") if ".venv" not in p.parts and "runs" not in p.parts and p not in ACCELERATE_YAML
)


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=[str(p.relative_to(ROOT)) for p in SHIPPED_YAML])
def test_every_shipped_yaml_loads(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("path", ACCELERATE_YAML, ids=[p.name for p in ACCELERATE_YAML])
def test_every_shipped_accelerate_config_is_read_by_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig) and cfg.num_processes >= 2
    assert str(cfg.distributed_type).split(".")[-1] in {"MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED"}


def test_accelerate_examples_cover_ddp_fsdp_and_deepspeed():
    assert {p.stem for p in ACCELERATE_YAML} >= {"ddp", "fsdp", "deepspeed_zero3"}


def test_shipped_yaml_exists():
    assert any(p.name == "llamaduo.yaml" for p in SHIPPED_YAML)


def test_example_yaml_round_trips_to_defaults(tmp_path):
    p = tmp_path / "llamaduo.yaml"
    p.write_text(example_yaml())
    loaded = load_config(p)
    assert loaded.model_dump(exclude={"runs_dir"}) == Config().model_dump(exclude={"runs_dir"})
    assert "# Share of each category held out as the test split." in example_yaml()


def test_unknown_key_is_rejected_with_its_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochz: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: train.epochz: Extra inputs are not permitted"):
        load_config(p)


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(p)


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "c.yaml"
    p.write_text("data:\n  input: cov.jsonl\nruns_dir: out\n")
    cfg = load_config(p)
    assert cfg.data.input == tmp_path / "sub" / "cov.jsonl"
    assert cfg.run_dir == tmp_path / "sub" / "out" / "llamaduo-run"


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  epochs: 1\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:3: invalid YAML: duplicate key 'epochs' \(first on line 2\)"):
        load_config(p)


def test_a_directory_given_as_the_config_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
