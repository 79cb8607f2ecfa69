"""Stage — tasks, input side: a user's test file for a built-in task, checked against the format of the
task's shipped test rows, and a user task's metric with its schema file or pattern.

In: a .json/.jsonl file and the task's ``RowFormat`` (Halu-CoT-JSON: ``prompt`` + ``response`` label yes/no;
IS-EN-NEWS: ``query`` + ``response``). Out: ``(line, text, answer)`` per row. A bad row (missing or empty
field, a label that is not allowed, a prompt without the task's fields, not JSON) stops with the file, line
and field, before any model loads; so does a schema file that is not a JSON schema or a pattern that does
not compile (``USER_METRICS``: metric name -> builder of the corpus and per-row scoring functions).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jsonschema

from tell import metrics
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


# --- user tasks: metric, schema, pattern -----------------------------------------------------

def _load_schema(schema_file: str | Path | None) -> dict:
    if schema_file is None:
        raise TellInputError("metric 'json-schema' needs a JSON schema file (schema_file)",
                             field="schema_file")
    path = Path(schema_file)
    if not path.is_file():
        raise TellInputError("schema file not found", path)
    try:
        schema = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise TellInputError(f"malformed JSON schema: {err.msg} at column {err.colno}", path,
                             err.lineno) from None
    if not isinstance(schema, dict):
        raise TellInputError("a JSON schema must be a JSON object", path, 1)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise TellInputError(f"not a valid JSON schema: {err.message}", path) from None
    return schema


def _compile_pattern(pattern: str | None) -> str:
    if pattern is None:
        raise TellInputError("metric 'regex' needs a pattern (pattern)", field="pattern")
    try:
        re.compile(pattern)
    except re.error as err:
        raise TellInputError(f"invalid regular expression {pattern!r}: {err}", field="pattern") from None
    return pattern


def _exact_scorers(**_) -> tuple[Callable, Callable]:
    return metrics.exact_scores, metrics.exact_row_scores


def _regex_scorers(pattern=None, **_) -> tuple[Callable, Callable]:
    pattern = _compile_pattern(pattern)
    return (lambda o, r: metrics.regex_scores(o, r, pattern),
            lambda o, r: metrics.regex_row_scores(o, r, pattern))


def _schema_scorers(schema_file=None, **_) -> tuple[Callable, Callable]:
    schema = _load_schema(schema_file)
    return (lambda o, r: metrics.json_schema_scores(o, r, schema),
            lambda o, r: metrics.json_schema_row_scores(o, r, schema))


def _translation_scorers(row_metric: str) -> Callable[..., tuple[Callable, Callable]]:
    # chrf and bleu both report the two corpus scores; they differ in the per-row score.
    return lambda **_: (metrics.translation_scores,
                        lambda o, r: metrics.translation_row_scores(o, r, row_metric))


USER_METRICS: dict[str, Callable[..., tuple[Callable, Callable]]] = {
    "json-schema": _schema_scorers,
    "exact": _exact_scorers,
    "regex": _regex_scorers,
    "chrf": _translation_scorers("chrf"),
    "bleu": _translation_scorers("bleu"),
}
USER_MAX_NEW_TOKENS = {"json-schema": 256, "exact": 256, "regex": 256, "chrf": 512, "bleu": 512}
