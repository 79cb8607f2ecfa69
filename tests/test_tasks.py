"""Tests of tell.tasks: Halu-CoT-JSON train/test disjointness and prompt format, IS-EN 2-shot
prompts, seeded sampling, and user tasks with each metric and their input errors."""
from __future__ import annotations

import json

import pytest

from tell import tasks
from tell.data import TellInputError, read_records
from tell.metrics import HALU_SCHEMA, parse_strict


@pytest.fixture(scope="module")
def halu_test():
    return read_records(tasks.HALU_TEST_FILE)


@pytest.fixture(scope="module")
def pool_rows():
    return read_records(tasks.HALU_POOL_FILE)


# --- halu-cot-json ----------------------------------------------------------------------------

def test_train_pool_is_disjoint_from_test_prompts(halu_test, pool_rows):
    pool = tasks.halu_train_pool()
    assert len(pool.examples) + pool.skipped_in_test + pool.skipped_too_long == len(pool_rows)
    assert pool.skipped_in_test >= len(halu_test)  # every test prompt comes from a HaluEval row
    test_text = "\n".join(rec["prompt"] for _, rec in halu_test)
    test_queries = {tasks.halu_query_of(rec["prompt"]) for _, rec in halu_test}
    by_line = dict(pool_rows)
    for example in pool.examples:
        query = by_line[example.line]["user_query"]
        assert query not in test_queries and query not in test_text, example.id
        assert example.prompt_messages[0]["content"] not in test_text
    ids = [e.id for e in pool.examples]
    assert len(set(ids)) == len(ids)


def test_rebuilt_prompts_equal_test_prompts(halu_test, pool_rows):
    by_query = {rec["user_query"]: rec for _, rec in pool_rows}
    for _, rec in halu_test:  # all 1006 test prompts, rebuilt from their HaluEval rows
        row = by_query[tasks.halu_query_of(rec["prompt"])]
        assert tasks.halu_prompt(row["user_query"], row["chatgpt_response"]) == rec["prompt"]
    assert tasks.halu_prompt_prefix().startswith("Role and Goal:")


def test_train_targets_validate_and_match_labels(pool_rows):
    by_line = dict(pool_rows)
    for example in tasks.halu_train_pool().examples:
        assert [m["role"] for m in example.messages] == ["user", "assistant"]
        assert example.source == "task"
        answer = parse_strict(example.answer, HALU_SCHEMA)
        assert answer is not None, example.id
        assert answer["hallucination"] == by_line[example.line]["hallucination"]


def test_thought_quotes_spans_and_clips_long_ones():
    from tell.halu_targets import SPAN_MAX_CHARS
    row = {"user_query": "Where is Paris?", "chatgpt_response": "Paris is in Spain. " + "x" * 500,
           "hallucination": "yes", "hallucination_spans": ["Paris is in Spain.", "x" * 500, "Incomplete answer"]}
    thought = tasks.halu_thought(row)
    assert '"Paris is in Spain."' in thought and "Incomplete answer." in thought and '"Where is Paris?"' in thought
    assert "x" * SPAN_MAX_CHARS + "..." in thought and "x" * (SPAN_MAX_CHARS + 1) not in thought
    assert json.loads(tasks.halu_target(row)) == {"thought": thought, "hallucination": "yes"}
    no_spans = tasks.halu_thought({**row, "hallucination_spans": []})  # quotes the key sentence instead
    assert '"Paris is in Spain."' in no_spans and "Incomplete" not in no_spans


def test_no_thought_quotes_the_query_and_the_key_sentence():
    from tell.halu_targets import CONSISTENT, key_sentence
    row = {"user_query": "Name the longest river in Africa.\nAnswer briefly.", "hallucination": "no",
           "chatgpt_response": "As an AI language model, I know rivers. The longest river in Africa is the Nile.",
           "hallucination_spans": []}
    assert key_sentence(row["user_query"], row["chatgpt_response"]) == "The longest river in Africa is the Nile."
    thought = tasks.halu_thought(row)
    assert '"Name the longest river in Africa."' in thought and "Answer briefly" not in thought
    assert '"The longest river in Africa is the Nile."' in thought and thought.endswith(CONSISTENT)
    assert key_sentence("Say hi", "As an AI language model, I cannot do that.") == "I cannot do that."
    other = tasks.halu_thought({**row, "user_query": "Which river is longest in Africa?"})
    assert other != thought and tasks.halu_thought(row) == thought  # from the row, deterministic


def test_fixed_phrases_are_short_so_no_span_is_shared_by_every_target():
    from tell import halu_targets
    from tell.diagnostics import SPAN_TOKENS, span_words
    for name in ("ASKS", "SAYS", "CONSISTENT", "CLAIMS", "WRONG", "NOTED"):
        assert all(len(span_words(p)) <= 4 for p in getattr(halu_targets, name)), name
    # 2 JSON words ('"hallucination": "no"}') + a closing phrase still leave room for row words in any span
    assert 2 + max(len(span_words(p)) for p in halu_targets.CONSISTENT) < SPAN_TOKENS


def test_no_targets_over_the_pool_are_distinct_and_share_no_common_span(pool_rows):
    """The distribution the issue asks for: distinct "no" thoughts and the most shared 8-word span."""
    from collections import Counter
    from tell.diagnostics import token_spans
    answers = [json.loads(e.answer) for e in tasks.halu_train_pool().examples]
    no = [a["thought"] for a in answers if a["hallucination"] == "no"]
    assert len(set(no)) == len(no) > 2000
    spans = Counter(span for thought in no for span in token_spans(thought))
    assert spans.most_common(1)[0][1] <= 0.02 * len(no)  # measured: 19 of 2,468 ("generate a list of")
    assert len({json.loads(tasks.halu_target(row))["thought"] for _, row in pool_rows}) == len(pool_rows)


def test_halu_sampling_is_seeded():
    task = tasks.get_task("halu-cot-json")
    a, b, c = task.train_examples(15, 0), task.train_examples(15, 0), task.train_examples(15, 1)
    assert len(a) == 15 and a == b and a != c
    assert set(e.id for e in a) <= set(e.id for e in task.train_examples(60, 0))  # nested per seed
    assert len(task.train_examples(None, 0)) == len(tasks.halu_train_pool().examples)
    with pytest.raises(TellInputError, match="training rows"):
        task.train_examples(10 ** 6, 0)
    rows = task.test_rows(20, 5)
    assert rows == task.test_rows(20, 5) and rows != task.test_rows(20, 6)
    assert [r.id for r in rows] == sorted((r.id for r in rows), key=lambda i: int(i.rsplit(":", 1)[1]))
    every = task.test_rows(None, 0)
    assert len(every) == 1006 and every[0].id == "halu-cot-json:test:1"
    assert every[0].messages[0]["role"] == "user" and every[0].reference in ("yes", "no")
    assert task.max_new_tokens == 192


def test_halu_task_scores():
    task = tasks.get_task("halu-cot-json")
    rows = task.test_rows(4, 0)
    outputs = [json.dumps({"thought": "t", "hallucination": r.reference}) for r in rows]
    scores = task.score(outputs, [r.reference for r in rows])
    assert scores["label_accuracy"] == 1.0 and scores["json_adherence_strict"] == 1.0
    assert task.row_scores(outputs, [r.reference for r in rows]) == [1.0] * 4
    # a wrong label (valid JSON) and an answer that is not JSON: half right, three quarters adherent
    flipped = {"yes": "no", "no": "yes"}[rows[1].reference]
    outputs[1] = json.dumps({"thought": "t", "hallucination": flipped})
    outputs[2] = "I think the answer is " + rows[2].reference
    scores = task.score(outputs, [r.reference for r in rows])
    assert scores["label_accuracy"] == 0.5 and scores["json_adherence_strict"] == 0.75
    assert task.row_scores(outputs, [r.reference for r in rows]) == [1.0, 0.0, 0.0, 1.0]


# --- is-en-news -------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["en-is", "is-en"])
def test_two_shot_prompt(direction):
    task = tasks.get_task(f"is-en-news:{direction}")
    shots = tasks.news_shots(direction)
    dev = read_records(tasks.NEWS_DIR / f"dev-{direction}.jsonl")
    lengths = sorted(len(r["query"]) + len(r["response"]) for _, r in dev)
    assert len(shots) == 2
    assert sorted(len(s.messages[0]["content"]) + len(s.answer) for s in shots) == lengths[:2]
    test = read_records(tasks.NEWS_DIR / f"test-{direction}.jsonl")
    rows = task.test_rows(None, 0)
    assert len(rows) == len(test)
    for row, (_, rec) in zip(rows, test):
        prompt = row.messages[0]["content"]
        assert len(row.messages) == 1 and row.reference == rec["response"]
        assert prompt.endswith("\n\n" + rec["query"])
        for shot in shots:
            assert f"{shot.messages[0]['content']}\n{shot.answer}\n\n" in prompt
    assert task.max_new_tokens == 512


def test_news_training_rows_are_dev_rows():
    task = tasks.get_task("en-is")
    assert task.name == "is-en-news:en-is" and tasks.get_task("is-en-news").name == "is-en-news:en-is"
    assert tasks.get_task("is-en").name == "is-en-news:is-en"
    dev = read_records(tasks.NEWS_DIR / "dev-en-is.jsonl")
    examples = task.train_examples(None, 0)
    assert [e.answer for e in examples] == [r["response"] for _, r in dev]
    assert all(e.source == "task" and e.file.endswith("dev-en-is.jsonl") for e in examples)
    assert task.train_examples(5, 2) == task.train_examples(5, 2) != task.train_examples(5, 3)


def test_clean_translation_and_news_scores():
    ref = "Sure, here is the Icelandic translation: \n\n Halló heimur\nGóðan dag."
    out = ref + "\n\nThis text is in English and needs to be translated into Icelandic. Please"
    assert tasks.clean_translation(out) == "Halló heimur\nGóðan dag."
    assert tasks.clean_translation("Halló") == "Halló"
    scores = tasks.news_scores([out], [ref])
    assert scores["chrf"] == pytest.approx(100.0) and scores["bleu"] == pytest.approx(100.0)
    assert tasks.news_row_scores(["Sure, here is the Icelandic translation: xyz"], [ref])[0] < 20.0


# --- built-in tasks on a user's test file ------------------------------------------------------

def _rows_file(tmp_path, rows, name="mine.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_halu_on_a_user_file_keeps_prompts_metrics_and_a_disjoint_training_pool(tmp_path, pool_rows):
    default = tasks.get_task("halu-cot-json")
    drawn = default.train_examples(15, 42)  # what compare would train on without the user's file
    by_line = dict(pool_rows)
    user = [{"prompt": tasks.halu_prompt(by_line[e.line]["user_query"], by_line[e.line]["chatgpt_response"]),
             "response": by_line[e.line]["hallucination"]} for e in drawn[:5]]
    user.append({"prompt": "Short check.\n'user_query' : Who wrote Hamlet?\n'chatgpt_response' : Dickens.",
                 "response": "Yes"})
    task = tasks.get_task("halu-cot-json", test_file=_rows_file(tmp_path, user))
    rows = task.test_rows(None, 0)
    assert task.name == "halu-cot-json" and task.max_new_tokens == 192
    assert [r.messages[0]["content"] for r in rows] == [u["prompt"] for u in user]  # the row's own prompt
    assert [r.reference for r in rows] == [u["response"] for u in user]
    assert rows[0].id.startswith("halu-cot-json:mine.jsonl@") and rows[-1].id.endswith(":6")
    outputs = [json.dumps({"thought": "t", "hallucination": u["response"].lower()}) for u in user]
    assert task.score(outputs, [r.reference for r in rows])["label_accuracy"] == 1.0  # "Yes" scores as "yes"
    # the user's queries leave the training pool (they were in it, and in the default draw)
    pool = task.train_examples(None, 0)
    user_queries = {tasks.halu_query_of(u["prompt"]) for u in user}
    assert len(pool) == len(default.train_examples(None, 0)) - 5
    assert not user_queries & {by_line[e.line]["user_query"] for e in pool}
    assert not {e.id for e in drawn[:5]} & {e.id for e in task.train_examples(15, 42)}
    assert tasks.halu_train_pool().examples == tuple(default.train_examples(None, 0))  # default unchanged


def test_news_on_a_user_file_builds_the_two_shot_prompt_from_the_query(tmp_path):
    dev = read_records(tasks.NEWS_DIR / "dev-en-is.jsonl")
    user = [{"query": "This text is in English. Translate it.\n\nGood morning.", "response": "Góðan dag."},
            {"query": dev[3][1]["query"], "response": dev[3][1]["response"]}]  # a dev row: must not train
    task = tasks.get_task("is-en-news:en-is", test_file=_rows_file(tmp_path, user))
    rows = task.test_rows(None, 0)
    assert [r.messages[0]["content"] for r in rows] == [tasks.news_prompt("en-is", u["query"]) for u in user]
    assert [r.reference for r in rows] == [u["response"] for u in user] and task.max_new_tokens == 512
    train = task.train_examples(None, 0)
    assert len(train) == len(dev) - 1 and user[1]["query"] not in {e.messages[0]["content"] for e in train}
    assert task.score(["Góðan dag.", user[1]["response"]], [r.reference for r in rows])["chrf"] > 99


def test_a_built_in_task_keeps_its_own_metric(tmp_path):
    path = _rows_file(tmp_path, [{"query": "q", "response": "r"}])
    with pytest.raises(TellInputError, match="built-in task and scores with its own metrics"):
        tasks.get_task("is-en-news:is-en", test_file=path, metric="exact")
    with pytest.raises(TellInputError, match=r"mine.jsonl:1 \(field 'prompt'\)"):
        tasks.get_task("halu-cot-json", test_file=path)


# --- user tasks -------------------------------------------------------------------------------

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def user_files(tmp_path):
    test = _write_jsonl(tmp_path / "test.jsonl", [
        {"prompt": "Capital of France?", "response": "Paris"},
        {"instruction": "Capital of Iceland?", "input": "", "output": "Reykjavík"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
    ])
    train = _write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "Capital of Norway?", "response": "Oslo"},
        {"prompt": "Capital of France?", "response": "Paris"},  # also a test prompt: dropped
    ])
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["answer"]}), encoding="utf-8")
    return test, train, schema


def test_user_task_rows(user_files):
    test, train, _ = user_files
    task = tasks.get_task("capitals", test_file=test, metric="exact", train_file=train)
    rows = task.test_rows(None, 0)
    assert [r.reference for r in rows] == ["Paris", "Reykjavík", "4"]
    assert rows[2].messages == ({"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "2+2?"})
    assert all(m["role"] != "assistant" for r in rows for m in r.messages)
    assert [e.answer for e in task.train_examples(None, 0)] == ["Oslo"]
    assert task.name == "capitals" and tasks.get_task("", test_file=test, metric="exact").name == "user"


def test_user_task_each_metric(user_files):
    test, _, schema = user_files
    refs = ["Paris", "Reykjavík", "4"]
    outs = ["Paris", '{"answer": "Reykjavík"}', " 4 "]
    exact = tasks.get_task("u", test_file=test, metric="exact")
    assert exact.score(outs, refs)["exact_match"] == pytest.approx(2 / 3)
    regex = tasks.get_task("u", test_file=test, metric="regex", pattern=r"^\s*\d+\s*$")
    assert regex.row_scores(outs, refs) == [0.0, 0.0, 1.0] and "regex_match" in regex.score(outs, refs)
    js = tasks.get_task("u", test_file=test, metric="json-schema", schema_file=schema)
    scores = js.score(outs, refs)
    assert scores["json_adherence_strict"] == pytest.approx(1 / 3)
    assert js.row_scores(outs, refs) == [0.0, 1.0, 0.0]
    for metric in ("chrf", "bleu"):
        task = tasks.get_task("u", test_file=test, metric=metric)
        assert set(task.score(refs, refs)) >= {"n", "chrf", "bleu", "ci95"}
        assert task.row_scores(refs, refs) == [pytest.approx(100.0)] * 3
        assert task.max_new_tokens == 512


def test_user_task_without_train_file_says_so(user_files):
    task = tasks.get_task("u", test_file=user_files[0], metric="exact")
    with pytest.raises(TellInputError, match="no training file"):
        task.train_examples(5, 0)


def test_user_task_errors(user_files, tmp_path):
    test, _, _ = user_files
    with pytest.raises(TellInputError, match="needs a JSON schema file"):
        tasks.get_task("u", test_file=test, metric="json-schema")
    with pytest.raises(TellInputError, match="schema file not found"):
        tasks.get_task("u", test_file=test, metric="json-schema", schema_file=tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object",\n "required": }', encoding="utf-8")
    with pytest.raises(TellInputError, match=r"bad.json:2: malformed JSON schema"):
        tasks.get_task("u", test_file=test, metric="json-schema", schema_file=bad)
    bad.write_text('{"type": 12}', encoding="utf-8")
    with pytest.raises(TellInputError, match="not a valid JSON schema"):
        tasks.get_task("u", test_file=test, metric="json-schema", schema_file=bad)
    with pytest.raises(TellInputError, match=r"unknown metric 'exactt'; did you mean 'exact'\?.*json-schema"):
        tasks.get_task("u", test_file=test, metric="exactt")
    with pytest.raises(TellInputError, match="needs a metric"):
        tasks.get_task("u", test_file=test)
    with pytest.raises(TellInputError, match="needs a pattern"):
        tasks.get_task("u", test_file=test, metric="regex")
    with pytest.raises(TellInputError, match="invalid regular expression"):
        tasks.get_task("u", test_file=test, metric="regex", pattern="(unclosed")
    with pytest.raises(TellInputError, match="file not found"):
        tasks.get_task("u", test_file=tmp_path / "missing.jsonl", metric="exact")
    with pytest.raises(TellInputError, match="built-in task and scores with its own metrics"):
        tasks.get_task("halu-cot-json", test_file=test, metric="exact")


def test_unknown_task_suggests():
    with pytest.raises(TellInputError, match=r"unknown task 'halu-cot-jsn'; did you mean 'halu-cot-json'"):
        tasks.get_task("halu-cot-jsn")
    with pytest.raises(TellInputError, match="is-en-news:en-is"):
        tasks.get_task("nonsense")


def test_seeded_sample_edge_cases():
    items = list(range(10))
    assert tasks.seeded_sample(items, None, 0) == items and tasks.seeded_sample(items, 50, 0) == items
    assert tasks.seeded_sample(items, 0, 0) == []
    with pytest.raises(ValueError):
        tasks.seeded_sample(items, -1, 0)
