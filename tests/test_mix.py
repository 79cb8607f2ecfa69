"""Tests of tell.mix on the tiny tokenizer: the token ratio is hit, the same seed gives the same bytes, task
rows are spread through the mix, modes and orders, long rows, and the manifest."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from tell.config import MixConfig
from tell.data import Example, TellInputError, load_examples
from tell.mix import build_mix, draw_general, encode_examples, write_mix

FIXTURES = Path(__file__).parent / "fixtures"
NO_LIMIT = 10**6  # max_length for tests that are not about long rows


def task_row(i: int) -> Example:
    return Example(f"task:claims.jsonl:{i + 1}", (
        {"role": "user", "content": f"Claim {i}: the river is {i} km long. Is it supported?"},
        {"role": "assistant", "content": '{"hallucination": "%s"}' % ("yes" if i % 2 else "no")},
    ), "task", "claims.jsonl", i + 1)


@pytest.fixture(scope="module")
def task():
    return [task_row(i) for i in range(20)]


@pytest.fixture(scope="module")
def pool():
    return load_examples("alpaca", "general")  # 999 rows


def mix_of(task, general, tokenizer, max_length=NO_LIMIT, **options):
    return build_mix(task, general, MixConfig(**options), tokenizer, max_length, tokenizer_name="tiny")


def test_encoded_labels_start_exactly_at_the_answer(tiny_tokenizer, task):
    encoded = encode_examples(tiny_tokenizer, task[:3])
    for example, enc in zip(task, encoded):
        answer = tiny_tokenizer.decode(enc.input_ids[enc.prompt_tokens:])
        assert answer == example.answer + "<|im_end|>\n"


def test_general_to_task_token_ratio_is_within_one_percent(tiny_tokenizer, task, pool):
    mix = mix_of(task, pool, tiny_tokenizer, ratio="5")
    m = mix.manifest
    assert m["general_tokens"] == pytest.approx(5 * m["task_tokens"], rel=0.01)
    assert m["ratio"] == pytest.approx(5, rel=0.01)
    assert m["task_rows"] == 20
    assert m["task_tokens"] == sum(r.tokens for r in mix.rows if r.example.source == "task")
    assert m["general_tokens"] == sum(r.tokens for r in mix.rows if r.example.source == "general")
    general_ids = [r.example.id for r in mix.rows if r.example.source == "general"]
    assert len(general_ids) == len(set(general_ids)) == m["general_rows"]  # drawn without replacement


def test_manifest_has_the_documented_keys(tiny_tokenizer, task, pool):
    manifest = mix_of(task, pool, tiny_tokenizer, ratio="2").manifest
    for key in ("task_rows", "general_rows", "task_tokens", "general_tokens", "ratio", "seed", "tokenizer",
                "task_positions"):
        assert key in manifest
    assert manifest["tokenizer"] == "tiny"
    assert manifest["seed"] == 42


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tiny_tokenizer, task, pool, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_mix(mix_of(task, pool, tiny_tokenizer, ratio="5", seed=seed), tmp_path / name)
    for file in ("mix.jsonl", "manifest.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / "mix.jsonl").read_bytes() != (tmp_path / "c" / "mix.jsonl").read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "a" / "mix.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["source"] for r in rows} == {"task", "general"}
    assert rows[0].keys() >= {"id", "source", "tokens", "messages"}


def test_modes_sft_general_and_tell(tiny_tokenizer, task, pool):
    tell = mix_of(task, pool, tiny_tokenizer, ratio="5", mode="tell")
    sft = mix_of(task, pool, tiny_tokenizer, ratio="5", mode="sft")
    general = mix_of(task, pool, tiny_tokenizer, ratio="5", mode="general")
    assert {r.example.source for r in sft.rows} == {"task"}
    assert (sft.manifest["general_rows"], sft.manifest["general_tokens"], sft.manifest["task_rows"]) == (0, 0, 20)
    assert {r.example.source for r in general.rows} == {"general"}
    assert (general.manifest["task_rows"], general.manifest["task_positions"]) == (0, [])

    def general_ids(mix):
        return Counter(r.example.id for r in mix.rows if r.example.source == "general")
    assert general_ids(general) == general_ids(tell)  # the general arm sees exactly TELL's general rows
    assert Counter(r.example.id for r in tell.rows if r.example.source == "task") == Counter(e.id for e in task)


def test_ratio_max_uses_the_whole_pool_and_ratio_zero_none(tiny_tokenizer, task, pool):
    whole = mix_of(task, pool, tiny_tokenizer, ratio="max")
    assert whole.manifest["general_rows"] == len(pool) == whole.manifest["general_pool_rows"]
    assert whole.manifest["general_tokens"] == whole.manifest["general_pool_tokens"]
    assert len({r.example.id for r in whole.rows}) == len(pool) + len(task)
    none = mix_of(task, pool, tiny_tokenizer, ratio="0")
    assert none.manifest["general_rows"] == 0 and len(none.rows) == len(task)


def test_ratio_the_pool_cannot_meet_is_an_error_unless_repeats_are_allowed(tiny_tokenizer, task, general_file):
    small_pool = load_examples(general_file, "general")
    with pytest.raises(TellInputError, match=r"mix\.ratio.*--allow-repeat"):
        mix_of(task, small_pool, tiny_tokenizer, ratio="1000")
    mix = mix_of(task, small_pool, tiny_tokenizer, ratio="1000", allow_repeat=True)
    assert mix.manifest["general_repeats"] > 0
    assert mix.manifest["ratio"] == pytest.approx(1000, rel=0.01)


def test_pool_that_just_covers_the_target_is_not_refused():
    # Two 10-token rows, target 16: the second row ends the pool and crosses the target.
    indices, repeats = draw_general([10, 10], 16, seed=0, allow_repeat=False)
    assert sorted(indices) == [0, 1] and repeats == 0


@pytest.mark.parametrize("ratio", ["-1", "inf", "nan"])
def test_invalid_ratio_is_refused(tiny_tokenizer, task, pool, ratio):
    with pytest.raises(TellInputError, match="mix.ratio"):
        mix_of(task, pool[:5], tiny_tokenizer, ratio=ratio, allow_repeat=True)


@pytest.mark.parametrize("seed", [1, 2, 42])
def test_random_order_spreads_task_rows_over_the_whole_mix(tiny_tokenizer, task, pool, seed):
    mix = mix_of(task, pool[:380], tiny_tokenizer, ratio="max", seed=seed)  # 20 task rows among 400
    positions, length = mix.manifest["task_positions"], len(mix.rows)
    assert length == 400 and len(positions) == 20
    assert positions == [i for i, r in enumerate(mix.rows) if r.example.source == "task"]
    quarters = {p * 4 // length for p in positions}
    assert quarters == {0, 1, 2, 3}
    gaps = [b - a for a, b in zip([-1] + positions, positions + [length])]
    assert max(gaps) < length // 4  # a bunched mix would leave a gap of ~ 380


def test_order_strategies(tiny_tokenizer, task, pool):
    general = pool[:380]
    first = mix_of(task, general, tiny_tokenizer, ratio="max", order="task-first").manifest["task_positions"]
    last = mix_of(task, general, tiny_tokenizer, ratio="max", order="task-last").manifest["task_positions"]
    spread = mix_of(task, general, tiny_tokenizer, ratio="max", order="spread").manifest["task_positions"]
    assert first == list(range(20))
    assert last == list(range(380, 400))
    steps = {b - a for a, b in zip(spread, spread[1:])}
    assert steps == {20}  # one task row in the middle of each 1/20 of the mix
    assert spread[0] == 10


@pytest.fixture
def long_rows(tmp_path):
    """Return three task rows from a file whose line 2 is far longer than the others."""
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "Short one?", "response": "Yes."},
            {"prompt": "Long one? " + "very " * 200, "response": "Long " * 50},
            {"prompt": "Short two?", "response": "No."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return load_examples(path, "task")


def test_long_row_error_names_file_and_line(tiny_tokenizer, long_rows, pool):
    with pytest.raises(TellInputError, match=r"long\.jsonl:2: row has \d+ tokens, more than max_length 64"):
        mix_of(long_rows, pool, tiny_tokenizer, max_length=64, mode="sft")


def test_long_rows_skipped_or_truncated_are_counted(tiny_tokenizer, long_rows, pool):
    skip = mix_of(long_rows, [], tiny_tokenizer, max_length=64, mode="sft", on_long="skip")
    assert skip.manifest["skipped_long"] == {"task": 1, "general": 0}
    assert sorted(r.example.line for r in skip.rows) == [1, 3]
    cut = mix_of(long_rows, [], tiny_tokenizer, max_length=64, mode="sft", on_long="truncate")
    assert cut.manifest["truncated_long"] == {"task": 1, "general": 0}
    long_row = next(r for r in cut.rows if r.example.line == 2)
    assert long_row.truncated and long_row.tokens == 64
    general = mix_of(long_rows[:1], pool[:50], tiny_tokenizer, max_length=300, ratio="max", on_long="skip")
    skipped = general.manifest["skipped_long"]["general"]
    assert skipped > 0 and general.manifest["general_rows"] == 50 - skipped


def test_empty_task_set_is_an_input_error(tiny_tokenizer, pool):
    with pytest.raises(TellInputError, match="data.task: the task set is empty"):
        mix_of([], pool, tiny_tokenizer)
    with pytest.raises(TellInputError, match="data.general: the general pool is empty"):
        mix_of([task_row(0)], [], tiny_tokenizer)


def test_general_rows_keep_their_source_label(tiny_tokenizer, task, pool):
    relabelled = [replace(e, source="general") for e in pool[:30]]
    mix = mix_of(task, relabelled, tiny_tokenizer, ratio="max")
    assert Counter(r.example.source for r in mix.rows) == {"task": 20, "general": 30}


def test_rows_of_a_tokenizer_without_chat_template_start_with_bos_and_train_eos(tiny_tokenizer):
    """A base model's tokenizer (no chat template): BOS opens every row and the prompt, EOS closes the
    answer and is among the trained (labelled) tokens; the prompt is a prefix of the full row."""
    import copy
    from tell.mix import encode_examples, render_prompt
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    example = Example("t:1", ({"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}))
    (encoded,) = encode_examples(plain, [example])
    ids = list(encoded.input_ids)
    assert ids[0] == plain.bos_token_id and ids.count(plain.bos_token_id) == 1
    assert ids[-1] == plain.eos_token_id and encoded.prompt_tokens < len(ids) - 1
    prompt = render_prompt(plain, example.prompt_messages)
    assert prompt.startswith(plain.bos_token) and prompt.endswith("assistant:\n")
    assert ids[:encoded.prompt_tokens] == plain(prompt, add_special_tokens=False)["input_ids"]
    assert plain.decode(ids[encoded.prompt_tokens:]) == "Red." + plain.eos_token


# --- a pool read on demand (IndexedPool), general-token budgets, labels on every assistant turn ---------

def general_of(mix):
    return [r for r in mix.rows if r.example.source == "general"]


def test_an_indexed_pool_is_drawn_without_tokenizing_it_whole(tiny_tokenizer, task, alpaca_as_sharegpt, tmp_path):
    from tell.mix import FILL_WINDOW, PREFETCH_ROWS
    pool = alpaca_as_sharegpt
    mix = mix_of(task, pool, tiny_tokenizer, ratio="5")
    m = mix.manifest
    assert m["general_tokens"] == pytest.approx(5 * m["task_tokens"], rel=0.01)
    assert m["general_pool_rows"] == 999 and m["general_pool_tokens"] is None  # never counted whole
    assert m["general_rows"] < m["general_rows_tokenized"] <= m["general_rows"] + PREFETCH_ROWS + FILL_WINDOW < 999
    assert m["general_pool"]["elements_read"] == 999 and m["general_pool"]["complete"]
    assert len({r.example.id for r in general_of(mix)}) == m["general_rows"]  # without replacement
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_mix(mix_of(task, pool, tiny_tokenizer, ratio="5", seed=seed), tmp_path / name)
    for file in ("mix.jsonl", "manifest.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / "mix.jsonl").read_bytes() != (tmp_path / "c" / "mix.jsonl").read_bytes()


def test_the_indexed_draw_is_the_in_memory_draw_when_its_fill_window_covers_the_pool(
        tiny_tokenizer, task, pool, alpaca_as_sharegpt, monkeypatch):
    import tell.mix
    monkeypatch.setattr(tell.mix, "FILL_WINDOW", 10**6)
    for ratio in ("0.5", "5"):
        lazy = mix_of(task, alpaca_as_sharegpt, tiny_tokenizer, ratio=ratio)
        eager = mix_of(task, pool, tiny_tokenizer, ratio=ratio)
        assert [r.example.messages for r in lazy.rows] == [r.example.messages for r in eager.rows]
        assert [r.tokens for r in lazy.rows] == [r.tokens for r in eager.rows]


@pytest.mark.parametrize("which", ["list", "indexed"])
def test_larger_budgets_draw_on_from_smaller_ones(tiny_tokenizer, task, pool, alpaca_as_sharegpt, which):
    general = pool if which == "list" else alpaca_as_sharegpt
    small, large = (mix_of(task, general, tiny_tokenizer, general_tokens=n) for n in (3000, 9000))
    small_ids = [r.example.id for r in general_of(small)]
    large_ids = {r.example.id for r in general_of(large)}
    assert len(set(small_ids) - large_ids) <= 1  # nested up to the one row that closed the smaller gap


@pytest.mark.parametrize("which", ["list", "indexed"])
def test_general_token_budget_is_met_whatever_the_task_size(tiny_tokenizer, task, pool, alpaca_as_sharegpt, which):
    general = pool if which == "list" else alpaca_as_sharegpt
    for rows in (task[:2], task):
        m = mix_of(rows, general, tiny_tokenizer, general_tokens=5000, ratio="1").manifest
        assert m["general_tokens"] == pytest.approx(5000, rel=0.01) and m["general_tokens_requested"] == 5000
        assert m["ratio_requested"] == round(5000 / m["task_tokens"], 6)
        assert "off the requested 5000 general tokens" in m["ratio_note"]
    assert mix_of(task, general, tiny_tokenizer, general_tokens=5000, mode="sft").manifest["general_tokens"] == 0


def test_long_rows_of_an_indexed_pool_follow_on_long(tiny_tokenizer, task, tmp_path):
    from conftest import sharegpt_pool_of, write_sharegpt
    conversations = [[("human", f"Question {i}?"), ("gpt", f"Answer {i}." + (" more" * 300 if i % 4 == 0 else ""))]
                     for i in range(160)]
    pool = sharegpt_pool_of(write_sharegpt(tmp_path / "long.json", conversations))
    with pytest.raises(TellInputError, match=r"long\.json:\d+: row has \d+ tokens, more than max_length 200"):
        mix_of(task[:1], pool, tiny_tokenizer, max_length=200, general_tokens=1500)
    skip = mix_of(task[:1], pool, tiny_tokenizer, max_length=200, general_tokens=1500, on_long="skip").manifest
    assert skip["skipped_long"]["general"] > 0 and skip["general_tokens"] == pytest.approx(1500, rel=0.05)
    cut = mix_of(task[:1], pool, tiny_tokenizer, max_length=200, general_tokens=1500, on_long="truncate")
    long_rows = [r for r in general_of(cut) if r.truncated]
    assert long_rows and all(r.tokens == 200 for r in long_rows)
    assert cut.manifest["truncated_long"]["general"] == len(long_rows)


def test_every_assistant_turn_and_nothing_else_is_labelled(tiny_tokenizer):
    chat = load_examples(FIXTURES / "chat.jsonl", "task")
    conversation = Example("g:1", (
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pick a number."},
        {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another one, and say why."},
        {"role": "assistant", "content": "3, because it is prime."}, {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome."}), "general")
    for example, enc in zip(chat + [conversation], encode_examples(tiny_tokenizer, chat + [conversation])):
        labelled = [tiny_tokenizer.decode(enc.input_ids[a:b]) for a, b in enc.label_spans]
        assert labelled == [m["content"] + "<|im_end|>\n" for m in example.messages if m["role"] == "assistant"]
        gaps = list(zip([0] + [b for _, b in enc.label_spans], [a for a, _ in enc.label_spans]))
        unlabelled = [tiny_tokenizer.decode(enc.input_ids[a:b]) for a, b in gaps]
        assert enc.label_spans[-1][1] == len(enc.input_ids)
        assert "".join(u + l for u, l in zip(unlabelled, labelled)) == tiny_tokenizer.decode(enc.input_ids)
        for m in example.messages:
            if m["role"] != "assistant":  # every system and user turn lies outside the labels
                assert any(m["content"] in u for u in unlabelled)
    assert len(encode_examples(tiny_tokenizer, [conversation])[0].label_spans) == 3
