"""Tests of tell.config (and the CLI's flag mapping): defaults < YAML < flags, did-you-mean for unknown
keys with the YAML file:line, typed values, validation of every field at once, config.yaml round trip."""
from __future__ import annotations

import pytest
import yaml

from tell import cli
from tell.config import (RunConfig, config_dict, config_from_dict, dump_config, load_config,
                         non_default_values)
from tell.data import TellInputError

YAML = """\
train:
  lr: 2.0e-4
  batch_size: 8
  epochs: 3
mix:
  ratio: 100
  order: spread
"""


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_from_argv(argv: list[str]) -> RunConfig:
    args, extra = cli.build_parser().parse_known_args(argv)
    return cli.config_from_args(args, extra)


def test_defaults_are_the_paper_values():
    cfg = load_config()
    assert (cfg.train.lora_r, cfg.train.lora_alpha, cfg.train.lr, cfg.train.batch_size) == (8, 32, 1e-4, 16)
    assert (cfg.mix.ratio, cfg.mix.order, cfg.mix.seed) == ("10", "random", 42)
    assert non_default_values(cfg) == {}


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = write(tmp_path, YAML)
    cfg = config_from_argv(["train", "--config", str(path), "--lr", "3e-4", "--train.batch_size", "4"])
    assert cfg.train.lr == 3e-4  # flag beats YAML
    assert cfg.train.batch_size == 4  # dotted flag beats YAML
    assert cfg.train.epochs == 3  # YAML beats default
    assert (cfg.mix.ratio, cfg.mix.order) == ("100", "spread")
    assert cfg.train.lora_r == 8  # untouched default
    assert non_default_values(cfg) == {"mix.ratio": "100", "mix.order": "spread", "train.lr": 3e-4,
                                       "train.batch_size": 4, "train.epochs": 3}


def test_dotted_flag_beats_short_flag_and_seed_sets_every_stage():
    cfg = config_from_argv(["train", "--lr", "3e-4", "--train.lr=5e-4", "--seed", "7"])
    assert cfg.train.lr == 5e-4
    assert (cfg.mix.seed, cfg.train.seed, cfg.generate.seed) == (7, 7, 7)


def test_load_config_applies_yaml_then_overrides(tmp_path):
    cfg = load_config(write(tmp_path, YAML), {"mix.ratio": "max", "train.epochs": "2"})
    assert (cfg.mix.ratio, cfg.train.epochs, cfg.train.batch_size) == ("max", 2, 8)


@pytest.mark.parametrize("text, line, suggestion", [
    ("train:\n  lr: 1.0e-4\n  lora_rank: 16\n", 3, "train.lora_r"),
    ("mix:\n  ratio: 10\ntrian:\n  lr: 1.0e-4\n", 4, "train.lr"),
])
def test_unknown_yaml_key_gives_did_you_mean_with_file_and_line(tmp_path, text, line, suggestion):
    path = write(tmp_path, text, "config.yaml")
    with pytest.raises(TellInputError) as info:
        load_config(path)
    assert f"config.yaml:{line}" in str(info.value)
    assert f"did you mean '{suggestion}'?" in str(info.value)


def test_unknown_dotted_flag_gives_did_you_mean():
    with pytest.raises(TellInputError, match=r"unknown config key 'train\.lr_rate'; did you mean 'train\.lr'"):
        config_from_argv(["train", "--train.lr_rate", "1e-3"])


@pytest.mark.parametrize("text, line, fragment", [
    ("train:\n  batch_size: many\n", 2, "'train.batch_size' must be int, got 'many'"),
    ("train:\n  lr: 1.0e-4\n  epochs: 1.5\n", 3, "'train.epochs' must be int, got 1.5"),
    ("mix:\n  allow_repeat: maybe\n", 2, "'mix.allow_repeat' must be bool"),
    ("anchor:\n  text:\n", 2, "'anchor.text' must be str, got None"),
    ("data:\n  task: [a.jsonl, b.jsonl]\n", 2, "'data.task' must be str"),
])
def test_mistyped_yaml_value_names_key_file_and_line(tmp_path, text, line, fragment):
    path = write(tmp_path, text, "typed.yaml")
    with pytest.raises(TellInputError) as info:
        load_config(path)
    assert f"typed.yaml:{line}" in str(info.value)
    assert fragment in str(info.value)


def test_mistyped_flag_value_is_an_input_error():
    with pytest.raises(TellInputError, match="'train.lr' must be float, got 'fast'"):
        config_from_argv(["train", "--train.lr", "fast"])


def test_every_invalid_value_is_reported_at_once():
    with pytest.raises(TellInputError) as info:
        load_config(None, {"mix.order": "zigzag", "mix.on_long": "ignore", "train.batch_size": 0})
    message = str(info.value)
    assert "mix.order = 'zigzag'" in message and "mix.on_long = 'ignore'" in message
    assert "train.batch_size must be >= 1" in message


@pytest.mark.parametrize("ratio", ["-1", "lots", "inf", "nan"])
def test_ratio_must_be_a_finite_non_negative_number_or_max(ratio):
    with pytest.raises(TellInputError, match="mix.ratio"):
        load_config(None, {"mix.ratio": ratio})


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-4\n   batch_size: 4\n", "broken.yaml")
    with pytest.raises(TellInputError, match=r"broken\.yaml:3: malformed YAML"):
        load_config(path)
    with pytest.raises(TellInputError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_yaml_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, YAML), {"anchor.text": "Be exact.", "mix.allow_repeat": "true",
                                              "out": str(tmp_path / "run"), "generate.greedy": "yes"})
    dump_config(cfg, tmp_path / "config.yaml")
    values = yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8"))
    assert config_from_dict(values) == cfg
    assert config_dict(config_from_dict(values)) == values
    assert load_config(tmp_path / "config.yaml") == cfg  # a run's config.yaml is itself a valid --config


def test_default_config_round_trips(tmp_path):
    dump_config(RunConfig(), tmp_path / "config.yaml")
    values = yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8"))
    assert config_from_dict(values) == RunConfig()
