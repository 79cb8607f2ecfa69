"""Tests of tell.task_files: a user's test file for a built-in task is read in the format of the task's
shipped test rows, and every bad row stops with its file, line and field."""
from __future__ import annotations

import json

import pytest

from tell import tasks
from tell.data import TellInputError
from tell.task_files import file_digest, read_test_file

HALU = tasks.HALU_TEST_FORMAT
NEWS = tasks.NEWS_TEST_FORMAT
PROMPT = "Check it.\n'user_query' : What is 2+2?\n'chatgpt_response' : 5"


def _write(tmp_path, *rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_the_shipped_test_files_pass_their_own_format():
    assert len(read_test_file(tasks.HALU_TEST_FILE, HALU)) == 1006
    assert len(read_test_file(tasks.NEWS_DIR / "test-en-is.jsonl", NEWS)) == 65


def test_rows_come_back_with_their_lines(tmp_path):
    path = _write(tmp_path, {"prompt": PROMPT, "response": "no"}, {"prompt": PROMPT, "response": " Yes "})
    assert read_test_file(path, HALU) == [(1, PROMPT, "no"), (2, PROMPT, " Yes ")]  # the scorer normalises case


@pytest.mark.parametrize("row, field, message", [
    ({"response": "no"}, "prompt", "missing field 'prompt'"),
    ({"prompt": PROMPT}, "response", "missing field 'response'"),
    ({"prompt": PROMPT, "response": "maybe"}, "response", "label 'maybe' is not one of 'yes', 'no'"),
    ({"prompt": PROMPT, "response": 1}, "response", "must be a non-empty string"),
    ({"prompt": "   ", "response": "no"}, "prompt", "must be a non-empty string"),
    ({"prompt": "Is 2+2 5?", "response": "no"}, "prompt", "not a Halu-CoT-JSON prompt"),
    ({"prompt": "'chatgpt_response' : 5\n'user_query' : 2+2?", "response": "no"}, "prompt", "and then"),
])
def test_bad_halu_rows_name_file_line_and_field(tmp_path, row, field, message):
    path = _write(tmp_path, {"prompt": PROMPT, "response": "yes"}, row)
    with pytest.raises(TellInputError, match=message) as err:
        read_test_file(path, HALU)
    assert f"rows.jsonl:2 (field '{field}')" in str(err.value)


def test_not_json_and_news_rows(tmp_path):
    with pytest.raises(TellInputError, match=r"rows.jsonl:2"):
        read_test_file(_write(tmp_path, {"query": "q", "response": "r"}, "{oops"), NEWS)
    with pytest.raises(TellInputError, match=r"rows.jsonl:1 \(field 'query'\).*'query' and 'response'"):
        read_test_file(_write(tmp_path, {"prompt": "q", "response": "r"}), NEWS)
    assert read_test_file(_write(tmp_path, {"query": "Translate: hi", "response": "hæ"}), NEWS) == \
        [(1, "Translate: hi", "hæ")]


def test_digest_follows_the_content(tmp_path):
    a = file_digest(_write(tmp_path, {"query": "q", "response": "r"}))
    b = file_digest(_write(tmp_path, {"query": "q", "response": "r2"}))
    assert len(a) == 8 and a != b
