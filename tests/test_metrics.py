"""Tests of tell.metrics: JSON adherence parsing, label metrics, bootstrap, chrF++/BLEU, user metrics."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tell import diagnostics, metrics
from tell.metrics import HALU_SCHEMA, parse_lenient, parse_strict

GOOD = '{"thought": "The response is consistent.", "hallucination": "no"}'


def both(output: str) -> tuple[bool, bool]:
    return parse_strict(output, HALU_SCHEMA) is not None, parse_lenient(output, HALU_SCHEMA) is not None


@pytest.mark.parametrize("output, strict, lenient", [
    (GOOD, True, True),
    ("\n  " + GOOD + "\n", True, True),
    ('{"thought": "x", "hallucination": "no", "confidence": 0.9}', False, False),  # extra key
    ('{"thought": "x", "hallucination": "maybe"}', False, False),  # label outside the enum
    ('{"thought": "x"}', False, False),  # missing label
    ('{"thought": 3, "hallucination": "yes"}', False, False),  # thought not a string
    (GOOD + "\nI hope this helps!", False, True),  # trailing prose
    ("Here is my analysis:\n```json\n" + GOOD + "\n```\nDone.", False, True),  # code fence
    ('{"thought": "it says {\\"a\\": {1}} and } then {", "hallucination": "yes"}', True, True),
    ('{"thought": "The response is consistent", "halluc', False, False),  # truncated
    ('{"thought": "a {b} c", "hallucination": "ye', False, False),  # truncated, braces in string
    ('{"thought": "Café þorp 😀 naïve", "hallucination": "yes"}', True, True),  # non-ASCII
    ("", False, False),
    ("no JSON here, just {braces} and }{", False, False),
    ("[" + GOOD + "]", False, True),  # a list is not an object; the object inside it is found
])
def test_parse_adherence(output, strict, lenient):
    assert both(output) == (strict, lenient)


def test_lenient_takes_first_parsable_object_only():
    # The first object that parses is the answer; a valid object after it does not rescue the row.
    assert parse_lenient('{"verdict": "no"} then ' + GOOD, HALU_SCHEMA) is None
    # An unparsable brace span before the answer is skipped, not fatal.
    assert parse_lenient("set {x | x > 0} means: " + GOOD, HALU_SCHEMA) == json.loads(GOOD)


def test_parse_returns_the_object_with_unicode_intact():
    obj = parse_lenient('```json\n{"thought": "þú sagðir é", "hallucination": "yes"}\n```', HALU_SCHEMA)
    assert obj == {"thought": "þú sagðir é", "hallucination": "yes"}


def _answer(label: str) -> str:
    return json.dumps({"thought": "t", "hallucination": label})


# Hand-made set: gold and outputs, with predictions yes, no, yes, no, None (unparsable), no (prose).
GOLD = ["yes", "yes", "no", "no", "yes", "no"]
OUTPUTS = [_answer("yes"), _answer("no"), _answer("yes"), _answer("no"), "I think yes",
           "Sure: " + _answer("no")]


def test_halu_scores_by_hand():
    s = metrics.halu_json_scores(OUTPUTS, GOLD)
    assert s["n"] == 6 and s["n_adherent"] == 5
    assert s["json_adherence_strict"] == pytest.approx(4 / 6)
    assert s["json_adherence_lenient"] == pytest.approx(5 / 6)
    # All rows: correct = rows 0, 3, 5; predicted yes = rows 0, 2 (TP row 0); gold yes = rows 0, 1, 4.
    assert s["label_accuracy"] == pytest.approx(3 / 6)
    assert s["label_precision"] == pytest.approx(1 / 2)
    assert s["label_recall"] == pytest.approx(1 / 3)
    assert s["label_f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))  # 0.4
    # Adherent rows 0, 1, 2, 3, 5: correct 0, 3, 5; predicted yes 0, 2; gold yes 0, 1.
    assert s["label_accuracy_adherent"] == pytest.approx(3 / 5)
    assert s["label_precision_adherent"] == pytest.approx(1 / 2)
    assert s["label_recall_adherent"] == pytest.approx(1 / 2)
    assert s["label_f1_adherent"] == pytest.approx(1 / 2)
    assert set(s["ci95"]) == {"json_adherence_strict", "json_adherence_lenient", "label_accuracy", "label_f1"}
    for key, (low, high) in s["ci95"].items():
        assert 0.0 <= low <= s[key] <= high <= 1.0, key
    assert metrics.halu_json_row_scores(OUTPUTS, GOLD) == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_halu_row_details():
    d = metrics.halu_json_row_details("Sure: " + _answer("no"), "no")
    assert d == {"strict": False, "lenient": True, "predicted": "no", "gold": "no", "correct": True}
    d = metrics.halu_json_row_details("no", "no")  # the bare gold word is not an adherent answer
    assert d["predicted"] is None and d["correct"] is False


def test_no_positive_predictions_gives_zero_precision():
    s = metrics.halu_json_scores([_answer("no"), "garbage"], ["yes", "no"])
    assert s["label_precision"] == 0.0 and s["label_recall"] == 0.0 and s["label_f1"] == 0.0
    assert s["label_accuracy"] == 0.0  # the unparsable row is wrong even though gold is "no"


def test_no_adherent_rows():
    s = metrics.halu_json_scores(["x", "y"], ["yes", "no"])
    assert s["n_adherent"] == 0 and s["label_accuracy_adherent"] == 0.0 and s["json_adherence_lenient"] == 0.0


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 outputs but 1 references"):
        metrics.halu_json_scores(["a", "b"], ["yes"])


def test_bootstrap_ci_is_seeded_and_contains_estimate():
    values = [1.0] * 30 + [0.0] * 20
    ci = metrics.bootstrap_ci(values, seed=3)
    assert ci == metrics.bootstrap_ci(values, seed=3)
    assert ci != metrics.bootstrap_ci(values, seed=4)
    assert ci[0] < 0.6 < ci[1]
    # A statistic function over resampled indices gives the same interval as the per-row mean.
    as_stat = metrics.bootstrap_ci(lambda idx: sum(values[i] for i in idx) / len(idx), len(values), seed=3)
    assert as_stat == pytest.approx(ci)
    with pytest.raises(ValueError):
        metrics.bootstrap_ci(lambda idx: 0.0)
    assert metrics.bootstrap_ci([]) == [0.0, 0.0]


def test_halu_scores_deterministic_for_seed():
    a = metrics.halu_json_scores(OUTPUTS * 5, GOLD * 5, seed=1)
    assert a == metrics.halu_json_scores(OUTPUTS * 5, GOLD * 5, seed=1)
    assert a["ci95"] != metrics.halu_json_scores(OUTPUTS * 5, GOLD * 5, seed=2)["ci95"]


HYPS = ["The cat sat on the mat.", "Veðrið er gott í dag á Íslandi.", "He went to the store yesterday.",
        "Þetta er prófun á þýðingu.", "A completely different sentence here."]
REFS = ["The cat was sitting on the mat.", "Veðrið er mjög gott í dag.", "Yesterday he went to the shop.",
        "Þetta er próf á þýðingu.", "Nothing in common with the output."]


def test_translation_scores_match_sacrebleu_cli(tmp_path: Path):
    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    cli = Path(sys.executable).parent / "sacrebleu"
    out = subprocess.run([str(cli), str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "--chrf-word-order", "2",
                          "-b", "-w", "4"], capture_output=True, text=True, check=True).stdout
    bleu, chrf = json.loads(out)
    s = metrics.translation_scores(HYPS, REFS)
    assert round(s["bleu"], 2) == round(bleu, 2)
    assert round(s["chrf"], 2) == round(chrf, 2)
    assert s["n"] == 5 and "nw:2" in s["chrf_signature"] and "tok:13a" in s["bleu_signature"]
    for key in ("chrf", "bleu"):
        low, high = s["ci95"][key]
        assert 0.0 <= low <= s[key] <= high <= 100.0
    assert s == metrics.translation_scores(HYPS, REFS)  # seeded


def test_translation_row_scores():
    rows = metrics.translation_row_scores(HYPS[:2] + REFS[2:3], REFS[:3])
    assert rows[2] == pytest.approx(100.0) and all(0.0 <= r < 100.0 for r in rows[:2])
    bleu_rows = metrics.translation_row_scores(REFS[:1], REFS[:1], metric="bleu")
    assert bleu_rows == [pytest.approx(100.0)]


def test_exact_scores():
    s = metrics.exact_scores([" Paris\n", "paris", "Rome"], ["Paris", "Paris", "Rome "])
    assert s["n"] == 3 and s["exact_match"] == pytest.approx(2 / 3)
    assert s["ci95"]["exact_match"][0] <= 2 / 3 <= s["ci95"]["exact_match"][1]
    assert metrics.exact_row_scores(["a "], ["a"]) == [1.0]


def test_regex_scores_search_anywhere():
    outs = ["The answer is 42.", "no number", "7"]
    assert metrics.regex_row_scores(outs, ["", "", ""], r"\d+") == [1.0, 0.0, 1.0]
    assert metrics.regex_row_scores(outs, ["", "", ""], r"^\d+$") == [0.0, 0.0, 1.0]
    assert metrics.regex_scores(outs, ["", "", ""], r"\d+")["regex_match"] == pytest.approx(2 / 3)


def test_json_schema_scores_user_schema():
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    outs = ['{"answer": 3}', 'Result: {"answer": 4} ok', '{"answer": "x"}', "none"]
    s = metrics.json_schema_scores(outs, [""] * 4, schema)
    assert s["json_adherence_strict"] == pytest.approx(1 / 4)
    assert s["json_adherence_lenient"] == pytest.approx(2 / 4)
    assert set(s["ci95"]) == {"json_adherence_strict", "json_adherence_lenient"}
    assert metrics.json_schema_row_scores(outs, [""] * 4, schema) == [1.0, 1.0, 0.0, 0.0]


# --- diagnostics: judging or copying -----------------------------------------------------------

def test_span_words_split_whitespace_and_json_escapes_and_strip_punctuation():
    assert diagnostics.span_words('{"thought": "The Response\\nsays \\"Yes\\" — ok."}') == \
        ["thought", "the", "response", "says", "yes", "—", "ok"]
    assert diagnostics.span_words("  ") == [] and diagnostics.span_words("### Task:") == ["###", "task"]
    assert diagnostics.token_spans("a b c", 2) == {("a", "b"), ("b", "c")} and diagnostics.token_spans("a b", 3) == set()


ANCHOR_TEXT = "The output should be a thought field, formatted as shown in the examples."  # 13 words


def test_anchor_copy_rate_by_hand():
    outputs = [
        '{"thought": "the OUTPUT should be a \\"thought\\" field, formatted as", "hallucination": "yes"}',  # 8 words
        "The output should be a thought field",  # 7 consecutive words only
        "formatted as shown in the examples. The output should",  # 6 + 3 across the seam: not one span
        "nothing alike",
    ]
    assert diagnostics.copy_rate(outputs, [ANCHOR_TEXT]) == pytest.approx(1 / 4)
    assert diagnostics.copy_rate(outputs, [ANCHOR_TEXT], n=7) == pytest.approx(2 / 4)
    assert diagnostics.copy_rate(outputs, []) == 0.0 and diagnostics.copy_rate([], [ANCHOR_TEXT]) == 0.0
    assert diagnostics.copy_rate(outputs, ["too short to copy"]) == 0.0
    assert diagnostics.copied_span(outputs[0], [ANCHOR_TEXT]) == "the output should be a thought field formatted"
    assert diagnostics.copied_span(outputs[1], [ANCHOR_TEXT]) is None


def test_target_copy_rate_sees_through_json_escapes():
    target = json.dumps({"thought": 'The query asks: "Name a river".\nIt replies "The Nile is long".',
                         "hallucination": "no"})
    plain = 'Asked: Name a river. It replies: "the nile is long" and that is all.'
    outputs = [target, plain, '{"thought": "It replies \\"The Nile is long\\".", "hallucination": "no"}']
    # row 0 is the target itself; row 1 shares "name a river it replies the nile is" (8 words);
    # row 2 shares only "it replies the nile is long hallucination no" around the JSON seam: also 8
    assert [diagnostics.copy_rate([o], [target]) for o in outputs] == [1.0, 1.0, 1.0]
    assert diagnostics.copy_rate(["Name a river, please. The Nile is long."], [target]) == 0.0


def test_distinct_output_fraction_and_majority_baseline():
    assert diagnostics.distinct_output_fraction(["a", " a\n", "b", "c"]) == pytest.approx(3 / 4)
    assert diagnostics.distinct_output_fraction([]) == 0.0
    assert diagnostics.majority_baseline(["no", "no", "yes"]) == pytest.approx(2 / 3)
    assert diagnostics.majority_baseline([]) == 0.0


def test_halu_label_diagnostics_count_labels_as_the_schema_spells_them():
    outputs = [_answer("yes"), "Sure: " + _answer("no"), '{"thought": "t", "hallucination": "Yes"}',
               '{"thought": "t", "hallucination": "Yes"}', "garbage",
               '{"thought": "t", "hallucination": "yes", "extra": 1}',  # a valid label in an invalid answer
               '{"thought": "t", "hallucination": true}']
    gold = ["yes", "no", "yes", "no", "no", "yes", "no"]
    d = diagnostics.halu_label_diagnostics(outputs, gold)
    assert d == {"majority_baseline": pytest.approx(4 / 7),
                 "predicted_label_counts": {"yes": 1, "no": 1, "Yes": 2, "none": 3}}
    assert list(d["predicted_label_counts"]) == ["yes", "no", "Yes", "none"]
    # "yes"/"no" count exactly the rows label_accuracy scores
    scores = metrics.halu_json_scores(outputs, gold)
    assert scores["label_accuracy"] == pytest.approx(2 / 7) and scores["label_accuracy"] < d["majority_baseline"]
    assert diagnostics.halu_label_diagnostics([], [])["predicted_label_counts"] == {"yes": 0, "no": 0, "none": 0}
    sentence = '{"thought": "t", "hallucination": "2. The relationship between them is complex."}'
    assert diagnostics.halu_counted_label(sentence) == "2. The relationship betw…"


def test_exact_label_diagnostics():
    d = diagnostics.exact_label_diagnostics([" spam", "ham", "Spam", "eggs"], ["spam", "spam ", "ham", "spam"])
    assert d == {"majority_baseline": pytest.approx(3 / 4),
                 "predicted_label_counts": {"ham": 1, "spam": 1, "none": 2}}


def test_output_diagnostics_keys_follow_what_is_known():
    outputs = ["same answer", "same answer", "other"]
    assert diagnostics.output_diagnostics(outputs) == {"distinct_output_fraction": pytest.approx(2 / 3)}
    known = diagnostics.output_diagnostics(outputs, anchor="", targets=[])
    assert known == {"distinct_output_fraction": pytest.approx(2 / 3), "anchor_copy_rate": 0.0,
                     "target_copy_rate": 0.0}
    copied = diagnostics.output_diagnostics([ANCHOR_TEXT, "x"], anchor=ANCHOR_TEXT, targets=["x y"])
    assert copied["anchor_copy_rate"] == 0.5 and copied["target_copy_rate"] == 0.0
