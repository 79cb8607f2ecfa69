"""Stage — metrics: score generated outputs against references; pure functions, no model.

In: model outputs and references (equal-length lists of strings), plus a JSON schema or regex for user tasks.
Out: plain dicts of metrics with ``n`` and seeded bootstrap intervals under ``ci95``; fractions lie in
[0, 1], chrF++ and BLEU keep sacrebleu's 0-100 scale. Per-row scores feed generations.jsonl.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Callable, Sequence

import jsonschema
import numpy as np
from sacrebleu.metrics import BLEU, CHRF

# The answer format of Halu-CoT-JSON: exactly these two keys, label restricted to yes/no.
HALU_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "thought": {"type": "string"},
        "hallucination": {"type": "string", "enum": ["yes", "no"]},
    },
    "required": ["thought", "hallucination"],
    "additionalProperties": False,
}
POSITIVE = "yes"  # "a hallucination is present" is the positive class for precision/recall
CI_LEVEL = 0.95
HALU_RESAMPLES = 1000
CORPUS_RESAMPLES = 200  # corpus chrF/BLEU per resample cost more than a mean; 200 keeps it fast

_DECODER = json.JSONDecoder()


# --- JSON adherence ---------------------------------------------------------------------------

@lru_cache(maxsize=32)
def _validator_for(schema_text: str):
    schema = json.loads(schema_text)
    return jsonschema.validators.validator_for(schema)(schema)


def _validates(obj: object, schema: dict) -> bool:
    # Keyed by the schema's canonical text so a schema dict is compiled once, not once per row.
    return _validator_for(json.dumps(schema, sort_keys=True)).is_valid(obj)


def parse_strict(output: str, schema: dict) -> dict | None:
    """Return the object if the whole output is one JSON object valid under `schema`, else None.

    Adherent means: after stripping surrounding whitespace, ``json.loads`` of the entire text
    gives a JSON object (not a list, string or number) and that object validates. Any other text
    (prose, code fences, a second object, truncation) makes the output non-adherent.
    """
    try:
        obj = json.loads(output.strip())
    except (json.JSONDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) and _validates(obj, schema) else None


def first_json_object(output: str) -> dict | None:
    """Return the first JSON object embedded anywhere in `output`, or None if there is none.

    Each ``{`` is tried in order of position; from it, the balanced span (braces matched while
    skipping JSON strings and their escapes, so ``"a {b}"`` inside a string is inert) must parse
    as a JSON object. The first ``{`` for which that holds wins; later objects are never looked at.
    """
    start = output.find("{")
    while start != -1:
        try:
            # raw_decode from a '{' consumes exactly the string-aware balanced span and fails
            # when that span is unbalanced (truncated) or is not valid JSON: the brace matcher.
            obj, _ = _DECODER.raw_decode(output, start)
            if isinstance(obj, dict):
                return obj
        except (json.JSONDecodeError, RecursionError):
            pass
        start = output.find("{", start + 1)
    return None


def parse_lenient(output: str, schema: dict) -> dict | None:
    """Return the first embedded JSON object if it validates under `schema`, else None.

    Adherent means: the first JSON object found by :func:`first_json_object` (prose, code fences
    such as ```json ... ``` and trailing text around it are allowed) validates. If that first
    parsable object does not validate, the output is not adherent even if a later object would:
    a reader of the output would take the first object as the answer.
    """
    obj = first_json_object(output)
    return obj if obj is not None and _validates(obj, schema) else None


# --- bootstrap --------------------------------------------------------------------------------

def resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """Return an (n_resamples, n) array of row indices drawn with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap_ci(values_or_stat: Sequence[float] | Callable[[np.ndarray], float], n: int | None = None,
                 *, n_resamples: int = HALU_RESAMPLES, seed: int = 0, level: float = CI_LEVEL) -> list[float]:
    """Return the percentile-bootstrap interval ``[low, high]`` of a statistic over rows.

    `values_or_stat` is either per-row values (the statistic is their mean) or a function taking
    an index array of resampled rows and returning the statistic; then `n` (rows) is required.
    The same (n, n_resamples, seed) always draws the same resamples, so metrics of one run are paired.
    """
    if callable(values_or_stat):
        if n is None:
            raise ValueError("bootstrap_ci with a statistic function needs n, the number of rows")
        stat = values_or_stat
    else:
        values = np.asarray(values_or_stat, dtype=float)
        n, stat = len(values), None
    if n == 0:
        return [0.0, 0.0]
    idx = resample_indices(n, n_resamples, seed)
    if stat is None:
        stats = values[idx].mean(axis=1)  # vectorised: one mean per resample row
    else:
        stats = np.array([stat(row) for row in idx], dtype=float)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return [float(low), float(high)]


def check_lengths(outputs: Sequence[str], references: Sequence[str]) -> None:
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")


# --- Halu-CoT-JSON ----------------------------------------------------------------------------

def gold_label(reference: str) -> str:
    return reference.strip().lower()


def halu_json_row_details(output: str, reference: str) -> dict:
    """Return one row's ``strict``/``lenient`` adherence, ``predicted`` label (None if not lenient-
    adherent), ``gold`` label and ``correct`` (lenient-adherent and predicted == gold)."""
    lenient = parse_lenient(output, HALU_SCHEMA)
    predicted = lenient["hallucination"] if lenient is not None else None
    gold = gold_label(reference)
    return {"strict": parse_strict(output, HALU_SCHEMA) is not None, "lenient": lenient is not None,
            "predicted": predicted, "gold": gold, "correct": predicted == gold}


def halu_json_row_scores(outputs: Sequence[str], references: Sequence[str]) -> list[float]:
    """Return 1.0 per row that is lenient-adherent with the gold label, else 0.0."""
    check_lengths(outputs, references)
    return [float(halu_json_row_details(o, r)["correct"]) for o, r in zip(outputs, references)]


def _safe_div(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def label_metrics(predicted: np.ndarray, gold: np.ndarray) -> dict:
    """Return precision, recall and F1 of boolean "is positive" arrays (predicted vs gold).

    A row without a prediction is passed as False in `predicted`: it can be a false negative but
    never a true positive (accuracy, which needs the exact label, is counted by the caller).
    Undefined ratios (no positive predictions, no positive gold, empty input) are 0.0.
    """
    tp = float(np.sum(predicted & gold))
    precision = _safe_div(tp, np.sum(predicted))
    recall = _safe_div(tp, np.sum(gold))
    return {"precision": precision, "recall": recall,
            "f1": _safe_div(2 * precision * recall, precision + recall)}


def _label_block(correct: np.ndarray, pred_pos: np.ndarray, gold_pos: np.ndarray) -> dict:
    metrics = label_metrics(pred_pos, gold_pos)
    return {"accuracy": _safe_div(np.sum(correct), len(correct)), **metrics}


def halu_json_scores(outputs: Sequence[str], references: Sequence[str], *,
                     n_resamples: int = HALU_RESAMPLES, seed: int = 0) -> dict:
    """Return JSON adherence and hallucination-label metrics of Halu-CoT-JSON outputs.

    Keys: ``n``, ``json_adherence_strict``, ``json_adherence_lenient`` (see parse_strict and
    parse_lenient); ``label_accuracy``/``_precision``/``_recall``/``_f1`` over all rows, "yes" being
    positive and a row without a lenient parse counted wrong (its label is None, never gold);
    the same four with suffix ``_adherent`` over the ``n_adherent`` lenient-adherent rows only
    (0.0 when there are none); ``ci95``: percentile-bootstrap ``[low, high]`` for the adherence
    rates, label_accuracy and label_f1. All values are fractions in [0, 1].
    """
    check_lengths(outputs, references)
    rows = [halu_json_row_details(o, r) for o, r in zip(outputs, references)]
    strict = np.array([r["strict"] for r in rows], dtype=bool)
    lenient = np.array([r["lenient"] for r in rows], dtype=bool)
    correct = np.array([r["correct"] for r in rows], dtype=bool)
    pred_pos = np.array([r["predicted"] == POSITIVE for r in rows], dtype=bool)
    gold_pos = np.array([r["gold"] == POSITIVE for r in rows], dtype=bool)

    every = _label_block(correct, pred_pos, gold_pos)
    adherent = _label_block(correct[lenient], pred_pos[lenient], gold_pos[lenient])
    scores = {"n": len(rows),
              "json_adherence_strict": _safe_div(strict.sum(), len(rows)),
              "json_adherence_lenient": _safe_div(lenient.sum(), len(rows)),
              **{f"label_{k}": v for k, v in every.items()},
              "n_adherent": int(lenient.sum()),
              **{f"label_{k}_adherent": v for k, v in adherent.items()}}

    def f1_of(idx: np.ndarray) -> float:
        return label_metrics(pred_pos[idx], gold_pos[idx])["f1"]

    ci = {"n_resamples": n_resamples, "seed": seed}
    scores["ci95"] = {
        "json_adherence_strict": bootstrap_ci(strict, **ci),
        "json_adherence_lenient": bootstrap_ci(lenient, **ci),
        "label_accuracy": bootstrap_ci(correct, **ci),
        "label_f1": bootstrap_ci(f1_of, len(rows), **ci),
    }
    return scores


# --- translation (chrF++, BLEU) ---------------------------------------------------------------

def _corpus_metrics() -> dict:
    # chrF++ is chrF with word bigrams (word_order=2); BLEU uses sacrebleu defaults (13a, exp smoothing).
    return {"chrf": CHRF(word_order=2), "bleu": BLEU()}


def _corpus_ci(metric, outputs: list[str], references: list[str], n_resamples: int, seed: int) -> list[float]:
    # Corpus chrF/BLEU are functions of summed per-sentence statistics: extract them once, then
    # each resample is a sum and a formula (the way sacrebleu's own bootstrap test does it).
    stats = np.asarray(metric._extract_corpus_statistics(outputs, [references]))

    def score_of(idx: np.ndarray) -> float:
        return metric._compute_score_from_stats(stats[idx].sum(axis=0).tolist()).score

    return bootstrap_ci(score_of, len(outputs), n_resamples=n_resamples, seed=seed)


def translation_scores(outputs: Sequence[str], references: Sequence[str], *,
                       n_resamples: int = CORPUS_RESAMPLES, seed: int = 0) -> dict:
    """Return corpus chrF++ and BLEU of `outputs` against one reference each.

    Keys: ``n``; ``chrf`` (sacrebleu ``CHRF(word_order=2)``, i.e. chrF++) and ``bleu`` (sacrebleu
    ``BLEU()``), both on sacrebleu's 0-100 scale since they are scores, not fractions;
    ``chrf_signature``/``bleu_signature``: sacrebleu's reproducibility strings; ``ci95``: bootstrap
    ``[low, high]`` for chrf and bleu, resampling rows and recomputing the corpus score.
    """
    check_lengths(outputs, references)
    outputs, references = list(outputs), list(references)
    scores: dict = {"n": len(outputs), "ci95": {}}
    for name, metric in _corpus_metrics().items():
        if not outputs:
            scores[name], scores[f"{name}_signature"], scores["ci95"][name] = 0.0, "", [0.0, 0.0]
            continue
        scores[name] = float(metric.corpus_score(outputs, [references]).score)
        scores[f"{name}_signature"] = metric.get_signature().format()
        scores["ci95"][name] = _corpus_ci(metric, outputs, references, n_resamples, seed)
    return {k: scores[k] for k in ("n", "chrf", "bleu", "chrf_signature", "bleu_signature", "ci95")}


def translation_row_scores(outputs: Sequence[str], references: Sequence[str],
                           metric: str = "chrf") -> list[float]:
    """Return per-row sentence chrF++ (or sentence BLEU with effective order), on the 0-100 scale."""
    check_lengths(outputs, references)
    scorers = {"chrf": CHRF(word_order=2), "bleu": BLEU(effective_order=True)}
    scorer = scorers[metric]
    return [float(scorer.sentence_score(o, [r]).score) for o, r in zip(outputs, references)]


# --- user-task metrics ------------------------------------------------------------------------

def _rate_scores(key: str, values: list[float], n_resamples: int, seed: int) -> dict:
    return {"n": len(values), key: _safe_div(sum(values), len(values)),
            "ci95": {key: bootstrap_ci(values, n_resamples=n_resamples, seed=seed)}}


def exact_row_scores(outputs: Sequence[str], references: Sequence[str]) -> list[float]:
    """Return 1.0 per row whose output equals the reference after stripping surrounding whitespace."""
    check_lengths(outputs, references)
    return [float(o.strip() == r.strip()) for o, r in zip(outputs, references)]


def exact_scores(outputs: Sequence[str], references: Sequence[str], *,
                 n_resamples: int = HALU_RESAMPLES, seed: int = 0) -> dict:
    """Return ``n``, ``exact_match`` (fraction of stripped-equal rows) and its ``ci95``."""
    return _rate_scores("exact_match", exact_row_scores(outputs, references), n_resamples, seed)


def regex_row_scores(outputs: Sequence[str], references: Sequence[str], pattern: str) -> list[float]:
    """Return 1.0 per row where ``re.search(pattern, output)`` finds a match anywhere; the
    references are not used (anchor the pattern with ^...$ to demand a whole-output match)."""
    check_lengths(outputs, references)
    compiled = re.compile(pattern)
    return [float(compiled.search(o) is not None) for o in outputs]


def regex_scores(outputs: Sequence[str], references: Sequence[str], pattern: str, *,
                 n_resamples: int = HALU_RESAMPLES, seed: int = 0) -> dict:
    """Return ``n``, ``regex_match`` (fraction of outputs the pattern re.search-es) and its ``ci95``."""
    return _rate_scores("regex_match", regex_row_scores(outputs, references, pattern), n_resamples, seed)


def json_schema_row_scores(outputs: Sequence[str], references: Sequence[str], schema: dict) -> list[float]:
    """Return 1.0 per lenient-adherent row (see parse_lenient); the references are not used."""
    check_lengths(outputs, references)
    return [float(parse_lenient(o, schema) is not None) for o in outputs]


def json_schema_scores(outputs: Sequence[str], references: Sequence[str], schema: dict, *,
                       n_resamples: int = HALU_RESAMPLES, seed: int = 0) -> dict:
    """Return ``n``, ``json_adherence_strict``, ``json_adherence_lenient`` and their ``ci95``."""
    check_lengths(outputs, references)
    strict = [float(parse_strict(o, schema) is not None) for o in outputs]
    lenient = json_schema_row_scores(outputs, references, schema)
    ci = {"n_resamples": n_resamples, "seed": seed}
    return {"n": len(outputs),
            "json_adherence_strict": _safe_div(sum(strict), len(strict)),
            "json_adherence_lenient": _safe_div(sum(lenient), len(lenient)),
            "ci95": {"json_adherence_strict": bootstrap_ci(strict, **ci),
                     "json_adherence_lenient": bootstrap_ci(lenient, **ci)}}
