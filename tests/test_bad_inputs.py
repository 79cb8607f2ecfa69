"""The bad-input corpus: every case ends `tell` with exit code 2 and one message naming the file, the line
(where there is one) and the field, with no traceback, and leaves nothing that looks like a run.
Odd but valid files (BOM, CRLF, trailing blank lines) are accepted."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tell import cli

FIXTURES = Path(__file__).parent / "fixtures"
BAD = FIXTURES / "bad"
GOOD_TASK = FIXTURES / "alpaca.jsonl"
GENERAL = FIXTURES / "general.jsonl"


def _write(tmp: Path, name: str, text: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _row(**fields) -> str:
    return json.dumps(fields) + "\n"


# name -> (function(tmp) returning extra argv that replaces/extends the defaults, substrings the message must hold)
CASES = {
    "malformed json line": (lambda t: ["--task", BAD / "malformed_line.jsonl"], ["malformed_line.jsonl:", "malformed JSON"]),
    "malformed json array": (lambda t: ["--task", BAD / "malformed_array.json"], ["malformed_array.json:", "malformed JSON"]),
    "invalid utf-8": (lambda t: ["--task", BAD / "invalid_utf8.jsonl"], ["invalid_utf8.jsonl:", "UTF-8"]),
    "binary file": (lambda t: ["--task", BAD / "binary.jsonl"], ["binary.jsonl"]),
    "nul bytes": (lambda t: ["--task", BAD / "nul_bytes.jsonl"], ["nul_bytes.jsonl:", "binary"]),
    "directory as file": (lambda t: ["--task", t], ["is a directory"]),
    "missing file": (lambda t: ["--task", t / "nope.jsonl"], ["nope.jsonl", "not found"]),
    "empty file": (lambda t: ["--task", BAD / "empty.jsonl"], ["empty.jsonl", "empty"]),
    "blank file": (lambda t: ["--task", BAD / "blank.jsonl"], ["blank.jsonl"]),
    "missing field": (lambda t: ["--task", BAD / "missing_field.jsonl"], ["missing_field.jsonl:", "field"]),
    "null field": (lambda t: ["--task", BAD / "null_field.jsonl"], ["null_field.jsonl:", "null"]),
    "wrong type": (lambda t: ["--task", BAD / "wrong_type.jsonl"], ["wrong_type.jsonl:", "expected a string"]),
    "no known shape": (lambda t: ["--task", BAD / "no_shape.jsonl"], ["no_shape.jsonl:", "no known shape"]),
    "row not an object": (lambda t: ["--task", BAD / "not_an_object.jsonl"], ["not_an_object.jsonl:", "JSON object"]),
    ".json not a list": (lambda t: ["--task", BAD / "not_a_list.json"], ["not_a_list.json:1", "list"]),
    "one-line object .json": (lambda t: ["--task", BAD / "object_oneline.json"], ["object_oneline.json:1"]),
    "unknown chat role": (lambda t: ["--task", BAD / "unknown_role.jsonl"], ["unknown_role.jsonl:", "unknown role"]),
    "chat ends on user": (lambda t: ["--task", BAD / "last_turn_user.jsonl"], ["last_turn_user.jsonl:", "assistant"]),
    "messages not a list": (lambda t: ["--task", _write(t, "m.jsonl", _row(messages="hi"))], ["m.jsonl:1", "messages"]),
    "message content number": (lambda t: ["--task", _write(t, "c.jsonl", _row(messages=[{"role": "user", "content": 3}]))],
                               ["c.jsonl:1", "content"]),
    "bad row on line 3": (lambda t: ["--task", _write(t, "l3.jsonl", _row(prompt="a", response="b") * 2 + "{oops\n")],
                          ["l3.jsonl:3"]),
    "bad general file": (lambda t: ["--general", BAD / "wrong_type.jsonl"], ["wrong_type.jsonl:"]),
    "empty anchor": (lambda t: ["--anchor", "   "], ["anchor", "empty"]),
    "empty anchor file": (lambda t: ["--anchor-file", _write(t, "a.txt", "\n")], ["a.txt", "empty"]),
    "missing anchor file": (lambda t: ["--anchor-file", t / "none.txt"], ["none.txt", "not found"]),
    "ratio the pool cannot meet": (lambda t: ["--ratio", "100000"], ["mix.ratio", "pool"]),
    "negative ratio": (lambda t: ["--ratio", "-1"], ["mix.ratio"]),
    "ratio not a number": (lambda t: ["--ratio", "lots"], ["mix.ratio"]),
    "row longer than max length": (lambda t: ["--max-length", "8"], ["alpaca.jsonl:", "max_length"]),
    "unknown mode": (lambda t: ["--mode", "magic"], ["mix.mode"]),
    "missing model path": (lambda t: ["--model", t / "no_model_here"], ["no_model_here", "not found"]),
    "model dir without config": (lambda t: ["--model", t], ["config.json"]),
    "yaml unknown key": (lambda t: ["--config", _write(t, "c.yaml", "train:\n  lr: 1e-4\n  lorra_r: 4\n")],
                         ["c.yaml:3", "lorra_r", "did you mean"]),
    "yaml mistyped value": (lambda t: ["--config", _write(t, "c.yaml", "train:\n  batch_size: many\n")],
                            ["c.yaml:2", "batch_size"]),
    "yaml malformed": (lambda t: ["--config", _write(t, "c.yaml", "train: [unclosed\n")], ["c.yaml", "YAML"]),
    "yaml not a mapping": (lambda t: ["--config", _write(t, "c.yaml", "- a\n- b\n")], ["c.yaml", "mapping"]),
    "missing yaml": (lambda t: ["--config", t / "none.yaml"], ["none.yaml", "not found"]),
    "unknown dotted flag": (lambda t: ["--train.lrr", "1"], ["train.lrr", "did you mean"]),
    "batch size zero": (lambda t: ["--batch-size", "0"], ["train.batch_size"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tiny_model_dir, tmp_path, capsys):
    extra_fn, expected = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    extra = [str(a) for a in extra_fn(work)]
    args = {"--task": str(GOOD_TASK), "--general": str(GENERAL), "--model": str(tiny_model_dir),
            "--out": str(tmp_path / "run")}
    flags = []
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[extra[i]] = extra[i + 1]
        else:
            flags += extra[i:i + 2]
    argv = ["train", *[x for kv in args.items() for x in kv], *flags]
    assert cli.main(argv) == 2, case
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("tell train: error:")]
    assert len(errors) == 1, err
    for text in expected:
        assert text in errors[0], (case, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_the_corpus_has_at_least_30_cases():
    assert len(CASES) >= 30


def test_existing_output_dir_is_refused(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    assert cli.main(["train", "--task", str(GOOD_TASK), "--general", str(GENERAL), "--model", str(tiny_model_dir),
                     "--out", str(tmp_path / "run")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir_is_refused(tiny_model_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert cli.main(["train", "--task", str(GOOD_TASK), "--general", str(GENERAL), "--model", str(tiny_model_dir),
                     "--out", str(locked / "run")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_unwritable_output_parent_is_refused(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory is needed")
    assert cli.main(["train", "--task", str(GOOD_TASK), "--general", str(GENERAL), "--model", str(tiny_model_dir),
                     "--out", str(blocker / "run")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    from tell.data import TellInputError
    with pytest.raises(TellInputError):
        cli.main(["train", "--task", str(BAD / "malformed_line.jsonl"), "--model", str(tiny_model_dir),
                  "--out", str(tmp_path / "r"), "--debug"])


@pytest.mark.parametrize("name", ["odd_valid.jsonl", "odd_valid.json"])
def test_odd_but_valid_files_are_accepted(name, tiny_model_dir, tmp_path):
    assert cli.main(["mix", "--task", str(FIXTURES / name), "--general", str(GENERAL), "--model", str(tiny_model_dir),
                     "--ratio", "1", "--out", str(tmp_path / "m")]) == 0
