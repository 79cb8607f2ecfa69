"""Cache keys stay put when the code grows. A sweep cell spread over sittings finds its packed checkpoint
and its finished result by key: a key that changes because a setting was added restarts hours of training.
The expected keys below are those of today's defaults; when one changes, register the new setting with its
unset value (config.RUN_KEY_ADDED_LATER, config.CELL_KEY_ADDED_LATER) instead of editing the expected key — edit it
only for a change that should retrain (or re-evaluate) every run."""
from __future__ import annotations

import copy

import pytest

from tell import compare, config, sweep
from tell.config import RunConfig
from tell.data import Example

ROWS = [Example(id="task:1", messages=({"role": "user", "content": "Is the sky green?"},
                                       {"role": "assistant", "content": '{"answer": "no"}'}))]
TRAIN_KEY = "6f1a7a25ce084f82"
EVAL_KEY = "70ba7234d9c4a024"
CELL_KEY = "1ff44dae5154ed6b"


def test_the_run_key_of_the_default_config_is_unchanged():
    assert compare.train_key(RunConfig(), ROWS) == TRAIN_KEY, (
        "the training run key changed: register a new setting in config.RUN_KEY_ADDED_LATER")


def test_the_eval_key_of_the_default_config_is_unchanged():
    assert compare.eval_key(RunConfig(), None, ROWS, "halu-cot-json", True, "An anchor.") == EVAL_KEY, (
        "the evaluation key changed: register a new setting in config.RUN_KEY_ADDED_LATER")


def test_the_cell_key_of_the_default_config_is_unchanged():
    assert sweep.cell_key(RunConfig()) == CELL_KEY, "the sweep cell key changed: register a new setting in config.CELL_KEY_ADDED_LATER"


def _with_later_setting(monkeypatch, cfg: RunConfig, section: str, value) -> RunConfig:
    """Return a copy of cfg whose `section` has a setting config_dict did not know before."""
    extended = copy.deepcopy(cfg)
    object.__setattr__(getattr(extended, section), "a_later_setting", value)
    real = config.config_dict
    monkeypatch.setattr(config, "config_dict", lambda part: {**real(part), **(
        {"a_later_setting": part.a_later_setting} if hasattr(part, "a_later_setting") else {})})
    return extended


@pytest.mark.parametrize("section,anchor_mode", [("model", "manual"), ("mix", "manual"), ("train", "manual"),
                                                 ("anchor", "manual"), ("anchor", "self-instruct")])
def test_a_setting_registered_as_added_later_stays_out_of_the_run_key_at_its_unset_value(monkeypatch, section,
                                                                                          anchor_mode):
    cfg = RunConfig()
    cfg.anchor.mode = anchor_mode
    extended = _with_later_setting(monkeypatch, cfg, section, 0)
    assert compare.train_key(extended, ROWS) != compare.train_key(cfg, ROWS)
    monkeypatch.setitem(config.RUN_KEY_ADDED_LATER, f"{section}.a_later_setting", 0)
    assert compare.train_key(extended, ROWS) == compare.train_key(cfg, ROWS)
    object.__setattr__(getattr(extended, section), "a_later_setting", 3)
    assert compare.train_key(extended, ROWS) != compare.train_key(cfg, ROWS)


def test_a_generate_setting_registered_as_added_later_stays_out_of_the_eval_key(monkeypatch):
    cfg = RunConfig()
    extended = _with_later_setting(monkeypatch, cfg, "generate", 0)
    args = (None, ROWS, "halu-cot-json", True, "An anchor.")
    assert compare.eval_key(extended, *args) != compare.eval_key(cfg, *args)
    monkeypatch.setitem(config.RUN_KEY_ADDED_LATER, "generate.a_later_setting", 0)
    assert compare.eval_key(extended, *args) == compare.eval_key(cfg, *args)


def test_every_registered_setting_is_unset_at_its_default():
    """A resumed run's config is rebuilt from its config.yaml with the defaults for what it lacks: a registered
    setting's unset value must be that default, or the resume would pass its check and train with another."""
    from tell.config_keys import flat_fields
    fields = flat_fields(RunConfig())
    for dotted, unset in config.added_later().items():
        owner, field = fields[dotted]
        assert getattr(owner, field.name) == unset, dotted


def test_a_manual_anchor_key_leaves_out_exactly_the_self_instruct_settings():
    assert compare.SELF_INSTRUCT_ONLY == ("mode", "self_instruct_rows", "meta_prompt",
                                          "self_instruct_max_new_tokens", "self_instruct_tries")
