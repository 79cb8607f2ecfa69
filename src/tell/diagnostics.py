"""Evaluate-stage helper — diagnostics: is the model judging, or copying? Pure functions, no model.

In: model outputs, and what could be copied or faked: the gold labels, the run's anchor, its training
targets. Out: ``majority_baseline`` and ``predicted_label_counts`` (label tasks), ``distinct_output_fraction``,
``anchor_copy_rate`` and ``target_copy_rate`` — the keys every eval/score ``metrics.json``, compare and
sweep report carry beside the task's own metrics (metrics.py).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

from tell.metrics import HALU_SCHEMA, check_lengths, first_json_object, gold_label, parse_lenient

SPAN_TOKENS = 8
# Whitespace and the JSON escapes \n \r \t both separate words: a target is stored JSON-escaped,
# an anchor is plain text, and a copy of either may come out either way.
_WORD_SPLIT = re.compile(r"(?:\s|\\[nrt])+")
_WORD_EDGES = string.punctuation + "“”‘’«»…"
NO_LABEL = "none"
LABEL_KEY_CHARS = 24  # an out-of-schema label is counted as written, up to this many characters


def _fraction(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def span_words(text: str) -> list[str]:
    """Return the tokens that copy spans are counted in: the whitespace-separated words of `text`.

    A word is what ``str.split`` gives, with the JSON escapes ``\\n``, ``\\r``, ``\\t`` also splitting;
    it is lowercased and stripped of surrounding punctuation and quotes (so ``"The`` in an anchor and
    ``\\"the`` in a JSON string are one word); a word of punctuation only is kept as it is. No model
    tokenizer is involved, so ``tell score`` (no model loaded) counts exactly what ``compare`` counts.
    """
    return [w.strip(_WORD_EDGES).lower() or w for w in _WORD_SPLIT.split(text) if w]


def token_spans(text: str, n: int = SPAN_TOKENS) -> set[tuple[str, ...]]:
    """Return every run of `n` consecutive span_words of `text` (none when it has fewer words)."""
    words = span_words(text)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copy_rate(outputs: Sequence[str], sources: Sequence[str], n: int = SPAN_TOKENS) -> float:
    """Return the fraction of `outputs` that contain an `n`-word span (see span_words) of any text in
    `sources`; 0.0 when there are no outputs or no source has `n` words."""
    spans = set().union(*(token_spans(s, n) for s in sources)) if sources else set()
    if not outputs or not spans:
        return 0.0
    return _fraction(sum(bool(token_spans(o, n) & spans) for o in outputs), len(outputs))


def copied_span(text: str, sources: Sequence[str], n: int = SPAN_TOKENS) -> str | None:
    """Return the first `n`-word span of `text` that also occurs in a source (its span_words joined by
    spaces), or None when `text` copies no such span."""
    spans = set().union(*(token_spans(s, n) for s in sources)) if sources else set()
    words = span_words(text)
    return next((" ".join(words[i:i + n]) for i in range(len(words) - n + 1) if tuple(words[i:i + n]) in spans),
                None)


def distinct_output_fraction(outputs: Sequence[str]) -> float:
    """Return distinct outputs ÷ rows (outputs compared after stripping surrounding whitespace).

    1.0: every row got its own answer; 1/n: one answer for every row, whatever the input.
    """
    return _fraction(len({o.strip() for o in outputs}), len(outputs))


def majority_baseline(gold: Sequence[str]) -> float:
    """Return the accuracy of always answering the most frequent gold label (0.0 for no rows)."""
    counts = Counter(gold)
    return _fraction(max(counts.values()), len(gold)) if counts else 0.0


def label_counts(predicted: Sequence[str | None], labels: Sequence[str]) -> dict[str, int]:
    """Return how often each label was predicted: every label in `labels` (0 if never), then any other
    value as written (most frequent first), then ``"none"`` for rows without a label (None)."""
    counts = Counter(NO_LABEL if p is None else p for p in predicted)
    out = {label: counts.pop(label, 0) for label in labels}
    none = counts.pop(NO_LABEL, 0)
    return {**out, **dict(counts.most_common()), NO_LABEL: none}


def halu_counted_label(output: str) -> str | None:
    """Return the label an output gives, as predicted_label_counts counts it.

    ``yes``/``no``: the output is lenient-adherent (see parse_lenient) with that label — exactly the
    rows label_accuracy scores. Labels compare case-sensitively, as HALU_SCHEMA's enum does: when the
    first JSON object of a non-adherent output has a string ``hallucination`` outside the enum, that
    string is returned as written (``"Yes"`` is its own label, scored wrong; a longer one than
    LABEL_KEY_CHARS is cut there, with "…"). Else None (no label).
    """
    adherent = parse_lenient(output, HALU_SCHEMA)
    if adherent is not None:
        return adherent["hallucination"]
    obj = first_json_object(output)
    value = obj.get("hallucination") if obj is not None else None
    enum = HALU_SCHEMA["properties"]["hallucination"]["enum"]
    if not isinstance(value, str) or value in enum:
        return None
    return value if len(value) <= LABEL_KEY_CHARS else value[:LABEL_KEY_CHARS] + "…"


def halu_label_diagnostics(outputs: Sequence[str], references: Sequence[str]) -> dict:
    """Return ``majority_baseline`` (of the gold labels) and ``predicted_label_counts`` (see
    halu_counted_label: keys ``yes``, ``no``, any out-of-schema label as written, then ``none``)."""
    check_lengths(outputs, references)
    labels = HALU_SCHEMA["properties"]["hallucination"]["enum"]
    return {"majority_baseline": majority_baseline([gold_label(r) for r in references]),
            "predicted_label_counts": label_counts([halu_counted_label(o) for o in outputs], labels)}


def exact_label_diagnostics(outputs: Sequence[str], references: Sequence[str]) -> dict:
    """Return ``majority_baseline`` and ``predicted_label_counts`` of an exact-match task, each distinct
    stripped reference being a label (case-sensitive, as exact_match is); an output equal to no label
    counts as ``none``."""
    check_lengths(outputs, references)
    gold = [r.strip() for r in references]
    labels = sorted(set(gold))
    return {"majority_baseline": majority_baseline(gold),
            "predicted_label_counts": label_counts([o.strip() if o.strip() in labels else None
                                                    for o in outputs], labels)}


def output_diagnostics(outputs: Sequence[str], anchor: str | None = None,
                       targets: Sequence[str] | None = None) -> dict:
    """Return the label-free diagnostics of a set of outputs.

    ``distinct_output_fraction`` always; ``anchor_copy_rate`` (outputs with an 8-word span of `anchor`,
    see copy_rate; 0.0 for an empty anchor) when the anchor is known; ``target_copy_rate`` (outputs with
    an 8-word span of any training target) when the training targets are known.
    """
    out = {"distinct_output_fraction": distinct_output_fraction(outputs)}
    if anchor is not None:
        out["anchor_copy_rate"] = copy_rate(outputs, [anchor])
    if targets is not None:
        out["target_copy_rate"] = copy_rate(outputs, list(targets))
    return out
