"""Stage — tasks: the built-in task registry (Halu-CoT-JSON, IS-EN news) and user-defined tasks.

In: a task name (with, optionally, a user test file in the format of the task's shipped test rows), or a
user test file with a metric (plus a schema file or regex where needed).
Out: a ``Task``: seeded training ``Example`` samples (source "task"), seeded ``TestRow`` samples
(prompt messages and reference), and the task's scoring functions and generation budget.
"""
from __future__ import annotations

import difflib
import json
import logging
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from tell import diagnostics, metrics
from tell.data import DATASETS_DIR, Example, FieldMap, TellInputError, read_records, record_to_messages
from tell.halu_targets import halu_thought
from tell.task_files import USER_MAX_NEW_TOKENS, USER_METRICS, RowFormat, file_digest, read_test_file

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class TestRow:
    """One evaluation prompt: `messages` are the prompt turns only (no assistant answer)."""

    __test__ = False  # not a pytest test class despite the name

    id: str
    messages: tuple[dict, ...]
    reference: str


@dataclass(frozen=True)
class Task:
    """A task: seeded train/test samplers, scorers and a generation budget."""

    name: str
    train_examples: Callable[[int | None, int], list[Example]]  # (n_rows or None = all, seed)
    test_rows: Callable[[int | None, int], list[TestRow]]  # (limit or None = all, seed)
    score: Callable[[list[str], list[str]], dict]  # (outputs, references) -> metrics dict
    row_scores: Callable[[list[str], list[str]], list[float]]
    max_new_tokens: int = 256
    label_diagnostics: Callable[[list[str], list[str]], dict] | None = None
    """(outputs, references) -> majority_baseline and predicted_label_counts; None for a label-free task."""


# --- shared helpers ---------------------------------------------------------------------------

def did_you_mean(kind: str, name: str, names: Sequence[str]) -> str:
    """Return an 'unknown X' message with the closest names and the full list."""
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {kind} {name!r}{hint} Available: {', '.join(names)}"


def seeded_sample(items: Sequence[T], k: int | None, seed: int) -> list[T]:
    """Return `k` items drawn without replacement with ``random.Random(seed)``, in their file order.

    The draw is a full seeded permutation cut to its first `k`, so for one seed a smaller sample
    is contained in a larger one (15 rows are among the 60). ``k=None`` or ``k >= len`` gives all.
    """
    if k is None or k >= len(items):
        return list(items)
    if k < 0:
        raise ValueError(f"sample size must be >= 0, got {k}")
    order = random.Random(seed).sample(range(len(items)), len(items))
    return [items[i] for i in sorted(order[:k])]  # file order: stable, readable generations files


def _train_sample(pool: Sequence[Example], n_rows: int | None, seed: int, task: str) -> list[Example]:
    if n_rows is not None and n_rows > len(pool):
        # Silently training on fewer rows than asked would mislabel a token-budget experiment.
        raise TellInputError(f"asked for {n_rows} training rows but task '{task}' has {len(pool)}")
    return seeded_sample(pool, n_rows, seed)


def _user(content: str) -> dict:
    return {"role": "user", "content": content}


def read_task_examples(path: str | Path, id_prefix: str) -> list[Example]:
    """Return the rows of a JSONL/JSON file (chat, Alpaca or prompt/response shape) as task
    examples with ids ``{id_prefix}:{line}``; the last message is the assistant answer."""
    path = Path(path)
    return [Example(f"{id_prefix}:{line}", record_to_messages(rec, FieldMap(), path, line), "task", str(path),
                    line) for line, rec in read_records(path)]


def _file_rows(task: str, test_file: str | Path, records: list[tuple[int, str, str]],
               prompt_of: Callable[[str], str]) -> tuple[TestRow, ...]:
    """Return a built-in task's test rows from a user file's records; ids carry the file's digest, so
    cached results follow the file's content."""
    prefix = f"{task}:{Path(test_file).name}@{file_digest(test_file)}"
    return tuple(TestRow(f"{prefix}:{line}", (_user(prompt_of(text)),), answer) for line, text, answer in records)


# --- halu-cot-json ----------------------------------------------------------------------------

HALU_TEST_FILE = DATASETS_DIR / "halu_cot_json_test.jsonl"
HALU_POOL_FILE = DATASETS_DIR / "halueval_general.jsonl"
HALU_MAX_PROMPT_CHARS = 12000
# Separators of the test prompts' task block (checked against all 1006 prompts in the tests).
_RELATIVES = "'relatives' : "
_QUERY = "\n'user_query' : "
_RESPONSE = "\n'chatgpt_response' : "
HALU_TEST_FORMAT = RowFormat("prompt", "response", ("yes", "no"), (_QUERY, _RESPONSE), "Halu-CoT-JSON")


@lru_cache(maxsize=1)
def _halu_test_records() -> tuple[tuple[int, dict], ...]:
    return tuple(read_records(HALU_TEST_FILE))


@lru_cache(maxsize=1)
def halu_prompt_prefix() -> str:
    """Return the instruction text of the test prompts: everything before "'relatives' : "."""
    first = _halu_test_records()[0][1]["prompt"]
    return first[: first.index(_RELATIVES)]  # copied from the data, never retyped


def halu_prompt(user_query: str, chatgpt_response: str) -> str:
    """Return a Halu-CoT-JSON prompt in exactly the test prompts' format (empty 'relatives')."""
    return f"{halu_prompt_prefix()}{_RELATIVES}{_QUERY}{user_query}{_RESPONSE}{chatgpt_response}"


def halu_query_of(prompt: str) -> str:
    """Return the user_query text of a Halu-CoT-JSON prompt (between its two field markers)."""
    start = prompt.index(_QUERY) + len(_QUERY)
    return prompt[start: prompt.index(_RESPONSE, start)]


def halu_target(row: dict) -> str:
    """Return the training answer: ``json.dumps({"thought", "hallucination"}, ensure_ascii=False)``
    with default separators, i.e. the ``{"thought": "...", "hallucination": "no"}`` shape the prompt
    itself shows; it validates against metrics.HALU_SCHEMA. The thought comes from the row itself
    (halu_targets.halu_thought)."""
    return json.dumps({"thought": halu_thought(row), "hallucination": row["hallucination"]},
                      ensure_ascii=False)


@dataclass(frozen=True)
class HaluTrainPool:
    """The HaluEval rows usable for training, and how many were left out and why."""

    examples: tuple[Example, ...]
    skipped_in_test: int  # user_query appears in a test prompt
    skipped_too_long: int  # rendered prompt over HALU_MAX_PROMPT_CHARS


@lru_cache(maxsize=1)
def halu_test_queries() -> frozenset[str]:
    """Return the user_query texts of all shipped test prompts."""
    return frozenset(halu_query_of(rec["prompt"]) for _, rec in _halu_test_records())


@lru_cache(maxsize=1)
def _halu_test_text() -> str:
    # Every prompt starts with the same prefix, so search the prefix once and the rest joined.
    cut = len(halu_prompt_prefix())
    return "\x00".join(rec["prompt"][cut:] for _, rec in _halu_test_records()) + "\x00" + halu_prompt_prefix()


def in_halu_test(user_query: str) -> bool:
    """Return True if `user_query` is a test prompt's query or occurs anywhere in a test prompt."""
    return user_query in halu_test_queries() or user_query in _halu_test_text()


@lru_cache(maxsize=4)
def halu_train_pool(user_test_prompts: tuple[str, ...] = ()) -> HaluTrainPool:
    """Return the HaluEval training pool, disjoint from the shipped test prompts and from
    `user_test_prompts` (a user's test file): by query, and by containment of the query text anywhere in
    a test prompt as a second guard."""
    user_queries = {halu_query_of(p) for p in user_test_prompts}
    user_text = "\x00".join(user_test_prompts)
    examples, in_test, too_long = [], 0, 0
    for line, row in read_records(HALU_POOL_FILE):
        query = row["user_query"]
        if in_halu_test(query) or query in user_queries or (user_text and query in user_text):
            in_test += 1
            continue
        prompt = halu_prompt(row["user_query"], row["chatgpt_response"])
        if len(prompt) > HALU_MAX_PROMPT_CHARS:
            too_long += 1
            continue
        messages = (_user(prompt), {"role": "assistant", "content": halu_target(row)})
        examples.append(Example(f"halu-cot-json:train:{line}", messages, "task", str(HALU_POOL_FILE), line))
    log.info("halu-cot-json train pool: %d rows; skipped %d in test, %d prompts over %d chars",
             len(examples), in_test, too_long, HALU_MAX_PROMPT_CHARS)
    return HaluTrainPool(tuple(examples), in_test, too_long)


@lru_cache(maxsize=1)
def _halu_test_rows() -> tuple[TestRow, ...]:
    return tuple(TestRow(f"halu-cot-json:test:{line}", (_user(rec["prompt"]),), rec["response"])
                 for line, rec in _halu_test_records())


def _halu_task(test_file: str | Path | None = None) -> Task:
    # Training keeps HaluEval's natural label mix (~18% "yes"), like the test set's (~19%).
    rows, held_out = _halu_test_rows(), ()
    if test_file is not None:  # the user's rows; HaluEval rows with their queries leave the training pool
        records = read_test_file(test_file, HALU_TEST_FORMAT)
        rows, held_out = _file_rows("halu-cot-json", test_file, records, str), tuple(p for _, p, _ in records)
    return Task(
        name="halu-cot-json",
        train_examples=lambda n, seed: _train_sample(halu_train_pool(held_out).examples, n, seed, "halu-cot-json"),
        test_rows=lambda limit, seed: seeded_sample(rows, limit, seed),
        score=metrics.halu_json_scores,
        row_scores=metrics.halu_json_row_scores,
        max_new_tokens=192,
        label_diagnostics=diagnostics.halu_label_diagnostics,
    )


# --- is-en-news -------------------------------------------------------------------------------

NEWS_DIR = DATASETS_DIR / "is_en_news"
N_SHOTS = 2
# References open with "Sure, here is the Icelandic translation: \n\n " (so will imitating outputs).
_PREAMBLE = re.compile(r"\A\s*Sure, here is the \w+ translation:\s*")
# A base model continuing the few-shot pattern starts a new instruction after its translation.
_NEXT_INSTRUCTION = re.compile(r"\n\s*This text is in \w+ and needs to be translated")


def clean_translation(text: str) -> str:
    """Return the translation proper: without the "Sure, here is the X translation:" preamble and
    cut before any following "This text is in ..." instruction (a continued few-shot pattern)."""
    match = _NEXT_INSTRUCTION.search(text)
    text = text[: match.start()] if match else text
    return _PREAMBLE.sub("", text).strip()


def news_scores(outputs: list[str], references: list[str]) -> dict:
    """Return metrics.translation_scores (chrF++, BLEU; 0-100) of the cleaned outputs and references."""
    return metrics.translation_scores([clean_translation(o) for o in outputs],
                                      [clean_translation(r) for r in references])


def news_row_scores(outputs: list[str], references: list[str]) -> list[float]:
    """Return per-row sentence chrF++ (0-100) of the cleaned outputs and references."""
    return metrics.translation_row_scores([clean_translation(o) for o in outputs],
                                          [clean_translation(r) for r in references])


@lru_cache(maxsize=4)
def _news_examples(split: str, direction: str) -> tuple[Example, ...]:
    path = NEWS_DIR / f"{split}-{direction}.jsonl"
    return tuple(read_task_examples(path, f"is-en-news:{direction}:{split}"))


def news_shots(direction: str) -> tuple[Example, ...]:
    """Return the fixed few-shot examples: the N_SHOTS shortest dev rows (query + response
    characters; ties by line), in file order, so they fit a small model's context."""
    dev = _news_examples("dev", direction)
    shortest = sorted(dev, key=lambda e: (len(e.messages[0]["content"]) + len(e.answer), e.line))[:N_SHOTS]
    return tuple(sorted(shortest, key=lambda e: e.line))


def news_prompt(direction: str, query: str) -> str:
    """Return the 2-shot prompt: each shot as "query\\nresponse", the shots and the test query
    joined by blank lines ("\\n\\n"); the model continues with the translation."""
    shots = [f"{s.messages[0]['content']}\n{s.answer}" for s in news_shots(direction)]
    return "\n\n".join([*shots, query])


@lru_cache(maxsize=2)
def _news_test_rows(direction: str) -> tuple[TestRow, ...]:
    return tuple(TestRow(e.id, (_user(news_prompt(direction, e.messages[0]["content"])),), e.answer)
                 for e in _news_examples("test", direction))


NEWS_TEST_FORMAT = RowFormat("query", "response", what="IS-EN-NEWS")


def _news_task(direction: str, test_file: str | Path | None = None) -> Task:
    name = f"is-en-news:{direction}"
    rows, train = _news_test_rows(direction), _news_examples("dev", direction)
    if test_file is not None:
        records = read_test_file(test_file, NEWS_TEST_FORMAT)
        rows = _file_rows(name, test_file, records, lambda query: news_prompt(direction, query))
        queries = {query for _, query, _ in records}
        train = tuple(e for e in train if e.messages[0]["content"] not in queries)  # a test row never trains
    return Task(
        name=name,
        train_examples=lambda n, seed: _train_sample(train, n, seed, name),
        test_rows=lambda limit, seed: seeded_sample(rows, limit, seed),
        score=news_scores,
        row_scores=news_row_scores,
        max_new_tokens=512,
    )


# --- registry ---------------------------------------------------------------------------------

# name -> Task builder; the optional argument is a user test file in the format of the task's own test rows
TASKS: dict[str, Callable[..., Task]] = {
    "halu-cot-json": _halu_task,
    "is-en-news:en-is": lambda test_file=None: _news_task("en-is", test_file),
    "is-en-news:is-en": lambda test_file=None: _news_task("is-en", test_file),
}
ALIASES = {"is-en-news": "is-en-news:en-is", "en-is": "is-en-news:en-is", "is-en": "is-en-news:is-en"}


# --- user tasks -------------------------------------------------------------------------------

def _user_task(name: str, test_file: str | Path, metric: str | None, schema_file, pattern,
               train_file) -> Task:
    if metric is None:
        raise TellInputError(f"a user task needs a metric, one of: {', '.join(USER_METRICS)}",
                             field="metric")
    if metric not in USER_METRICS:
        raise TellInputError(did_you_mean("metric", metric, list(USER_METRICS)), field="metric")
    score, row_scores = USER_METRICS[metric](schema_file=schema_file, pattern=pattern)
    tests = tuple(TestRow(e.id, e.prompt_messages, e.answer)
                  for e in read_task_examples(test_file, f"{name}:test"))
    train = _user_train_pool(name, train_file, tests) if train_file is not None else None

    def train_examples(n_rows: int | None, seed: int) -> list[Example]:
        if train is None:
            raise TellInputError(f"user task '{name}' has no training file (train_file)", field="train_file")
        return _train_sample(train, n_rows, seed, name)

    return Task(name=name, train_examples=train_examples,
                test_rows=lambda limit, seed: seeded_sample(tests, limit, seed),
                score=score, row_scores=row_scores, max_new_tokens=USER_MAX_NEW_TOKENS[metric],
                label_diagnostics=diagnostics.exact_label_diagnostics if metric == "exact" else None)


def _user_train_pool(name: str, train_file, tests: Sequence[TestRow]) -> tuple[Example, ...]:
    # A training row whose prompt is also a test prompt would leak the answer into the score.
    test_prompts = {json.dumps(t.messages, sort_keys=True) for t in tests}
    rows = read_task_examples(train_file, f"{name}:train")
    kept = tuple(e for e in rows if json.dumps(e.prompt_messages, sort_keys=True) not in test_prompts)
    if len(kept) < len(rows):
        log.warning("user task %s: dropped %d training rows whose prompt is also a test prompt",
                    name, len(rows) - len(kept))
    return kept


def get_task(name: str, test_file: str | Path | None = None, metric: str | None = None,
             schema_file: str | Path | None = None, pattern: str | None = None,
             train_file: str | Path | None = None) -> Task:
    """Return a built-in task by name (or alias), or a user task when `test_file` is given.

    A built-in task with a `test_file` evaluates on its rows, which have the format of the task's shipped
    test rows (Halu-CoT-JSON: prompt + response yes/no; IS-EN-NEWS: query + response), with the task's own
    prompts and metrics; its training rows stay disjoint from them. A user task is named `name` (``user``
    if empty); its test file holds prompt/answer rows in any shape data.record_to_messages reads, and
    `metric` is one of USER_METRICS.
    """
    canonical = ALIASES.get(name, name)
    if test_file is not None:
        if canonical in TASKS:
            if metric or schema_file or pattern:
                raise TellInputError(f"'{name}' is a built-in task and scores with its own metrics; drop the "
                                     "metric (or name your task differently, e.g. 'user', to score it with "
                                     f"'{metric or 'that metric'}')", field="metric")
            return TASKS[canonical](test_file)
        return _user_task(name or "user", test_file, metric, schema_file, pattern, train_file)
    if canonical not in TASKS:
        message = did_you_mean("task", name, [*TASKS, *ALIASES])
        raise TellInputError(message + "; or give a test file (and a metric) for a user task", field="task")
    return TASKS[canonical]()
