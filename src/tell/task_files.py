"""Stage — tasks, input side: a user's test file for a built-in task, checked against the format of the
task's shipped test rows.

In: a .json/.jsonl file and the task's ``RowFormat`` (Halu-CoT-JSON: ``prompt`` + ``response`` label yes/no;
IS-EN-NEWS: ``query`` + ``response``). Out: ``(line, text, answer)`` per row. A bad row (missing or empty
field, a label that is not allowed, a prompt without the task's fields, not JSON) stops with the file, line
and field, before any model loads.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tell.data import TellInputError, read_records


@dataclass(frozen=True)
class RowFormat:
    """The fields of a built-in task's test rows."""

    text_field: str  # the prompt (Halu) or the query the task builds its prompt from (IS-EN-NEWS)
    answer_field: str  # the reference: a label or a translation
    labels: tuple[str, ...] = ()  # allowed answers, compared stripped and lower-cased; empty = any text
    markers: tuple[str, ...] = ()  # text the prompt must contain, in this order (the task finds its fields by them)
    what: str = ""  # the task's name in messages


def read_test_file(path: str | Path, fmt: RowFormat) -> list[tuple[int, str, str]]:
    """Return (line, text, answer) of every row, or raise naming the first bad row's file, line and field."""
    rows = []
    for line, rec in read_records(path):
        for field in (fmt.text_field, fmt.answer_field):
            if field not in rec:
                raise TellInputError(f"missing field '{field}'; {fmt.what} test rows have "
                                     f"'{fmt.text_field}' and '{fmt.answer_field}'", path, line, field)
            if not isinstance(rec[field], str) or not rec[field].strip():
                raise TellInputError(f"'{field}' must be a non-empty string, got {rec[field]!r:.60}", path, line,
                                     field)
        text, answer = rec[fmt.text_field], rec[fmt.answer_field]
        if fmt.labels and answer.strip().lower() not in fmt.labels:
            raise TellInputError(f"label {answer!r:.60} is not one of {', '.join(map(repr, fmt.labels))}", path,
                                 line, fmt.answer_field)
        if not _in_order(text, fmt.markers):
            fields = " and then ".join(repr(m.strip()) for m in fmt.markers)
            raise TellInputError(f"not a {fmt.what} prompt: it needs {fields}, each starting a line, as in the "
                                 "shipped test prompts", path, line, fmt.text_field)
        rows.append((line, text, answer))
    return rows


def _in_order(text: str, markers: tuple[str, ...]) -> bool:
    position = 0
    for marker in markers:
        position = text.find(marker, position)
        if position < 0:
            return False
        position += len(marker)
    return True


def file_digest(path: str | Path) -> str:
    """Return 8 hex digits of the file's SHA-256: row ids carry it, so cached results follow the content."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]
