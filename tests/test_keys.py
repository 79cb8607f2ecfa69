"""Cache keys stay put when the code grows. A sweep cell spread over sittings finds its packed checkpoint
and its finished result by key: a key that changes because a setting was added restarts hours of training.
The expected keys below are those of today's defaults; when one changes, register the new setting with its
unset value (compare.RUN_KEY_ADDED_LATER, sweep.ADDED_LATER) instead of editing the expected key — edit it
only for a change that should retrain every run."""
from __future__ import annotations

import copy

import pytest

from tell import compare, sweep
from tell.config import RunConfig
from tell.data import Example

ROWS = [Example(id="task:1", messages=({"role": "user", "content": "Is the sky green?"},
                                       {"role": "assistant", "content": '{"answer": "no"}'}))]
TRAIN_KEY = "6f1a7a25ce084f82"
CELL_KEY = "1ff44dae5154ed6b"


def test_the_run_key_of_the_default_config_is_unchanged():
    assert compare.train_key(RunConfig(), ROWS) == TRAIN_KEY, (
        "the training run key changed: register a new setting in compare.RUN_KEY_ADDED_LATER")


def test_the_cell_key_of_the_default_config_is_unchanged():
    assert sweep.cell_key(RunConfig()) == CELL_KEY, "the sweep cell key changed: register a new setting in sweep.ADDED_LATER"


@pytest.mark.parametrize("section", ["model", "mix", "train"])
def test_a_setting_registered_as_added_later_stays_out_of_the_run_key_at_its_unset_value(monkeypatch, section):
    cfg = RunConfig()
    extended = copy.deepcopy(cfg)
    object.__setattr__(getattr(extended, section), "a_later_setting", 0)
    real = compare.config_dict
    monkeypatch.setattr(compare, "config_dict", lambda part: {**real(part), **(
        {"a_later_setting": part.a_later_setting} if hasattr(part, "a_later_setting") else {})})
    assert compare.train_key(extended, ROWS) != compare.train_key(cfg, ROWS)
    monkeypatch.setitem(compare.RUN_KEY_ADDED_LATER, f"{section}.a_later_setting", 0)
    assert compare.train_key(extended, ROWS) == compare.train_key(cfg, ROWS)
    object.__setattr__(getattr(extended, section), "a_later_setting", 3)
    assert compare.train_key(extended, ROWS) != compare.train_key(cfg, ROWS)
