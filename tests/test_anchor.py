"""Tests of tell.anchor: user-prefix and system placement, empty anchor, anchor text and file checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tell.anchor import anchored_examples, anchored_messages, resolve_anchor_text
from tell.config import AnchorConfig
from tell.data import Example, TellInputError, load_examples

FIXTURES = Path(__file__).parent / "fixtures"
ANCHOR = "Answer as a careful fact checker."


@pytest.fixture
def chat_examples():
    return load_examples(FIXTURES / "chat.jsonl", "task")


def test_user_prefix_puts_the_anchor_before_the_first_user_turn_only(chat_examples):
    multi_turn = chat_examples[2]
    anchored = anchored_examples([multi_turn], ANCHOR, "user-prefix")[0]
    assert anchored.messages[0] == {"role": "user", "content": f"{ANCHOR}\n\nPick a number."}
    assert anchored.messages[1:] == multi_turn.messages[1:]
    assert (anchored.id, anchored.file, anchored.line) == (multi_turn.id, multi_turn.file, multi_turn.line)


def test_user_prefix_skips_a_system_message(chat_examples):
    anchored = anchored_examples([chat_examples[1]], ANCHOR, "user-prefix")[0]
    assert anchored.messages[0] == {"role": "system", "content": "Answer in JSON."}
    assert anchored.messages[1]["content"] == f"{ANCHOR}\n\nIs water wet?"


def test_system_placement_adds_or_extends_the_system_message(chat_examples):
    added = anchored_examples([chat_examples[0]], ANCHOR, "system")[0]
    assert added.messages[0] == {"role": "system", "content": ANCHOR}
    assert added.messages[1:] == chat_examples[0].messages
    extended = anchored_examples([chat_examples[1]], ANCHOR, "system")[0]
    assert extended.messages[0] == {"role": "system", "content": f"{ANCHOR}\n\nAnswer in JSON."}
    assert extended.messages[1:] == chat_examples[1].messages[1:]


def test_anchoring_leaves_the_input_examples_untouched(chat_examples):
    before = [tuple(dict(m) for m in e.messages) for e in chat_examples]
    anchored_examples(chat_examples, ANCHOR, "user-prefix")
    anchored_examples(chat_examples, ANCHOR, "system")
    assert [e.messages for e in chat_examples] == before


def test_empty_anchor_leaves_rows_unchanged(chat_examples):
    assert anchored_examples(chat_examples, "", "user-prefix") == chat_examples
    assert anchored_messages(chat_examples[0].prompt_messages, "", "system") == chat_examples[0].prompt_messages
    assert resolve_anchor_text(AnchorConfig()) == ""


def test_anchor_text_is_stripped_and_whitespace_only_is_an_error():
    assert resolve_anchor_text(AnchorConfig(text=f"  {ANCHOR}\n")) == ANCHOR
    with pytest.raises(TellInputError, match=r"anchor\.text.*only whitespace"):
        resolve_anchor_text(AnchorConfig(text=" \n\t"))


def test_anchor_file_is_read_and_checked(tmp_path):
    assert resolve_anchor_text(AnchorConfig(file=str(FIXTURES / "anchor.txt"))) == ANCHOR
    with pytest.raises(TellInputError, match=r"missing\.txt: anchor file not found"):
        resolve_anchor_text(AnchorConfig(file=str(tmp_path / "missing.txt")))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(TellInputError, match=r"blank\.txt: anchor file is empty"):
        resolve_anchor_text(AnchorConfig(file=str(blank)))
    with pytest.raises(TellInputError, match="not both"):
        resolve_anchor_text(AnchorConfig(text=ANCHOR, file=str(FIXTURES / "anchor.txt")))


def test_anchor_mode_none_drops_any_text():
    assert resolve_anchor_text(AnchorConfig(text=ANCHOR, mode="none")) == ""
    with pytest.raises(TellInputError, match="self-instruct anchor has not been written"):
        resolve_anchor_text(AnchorConfig(mode="self-instruct"))


def test_self_instruct_shows_the_rows_and_cleans_the_answer(chat_examples):
    from tell.anchor import self_instruct_anchor
    seen = []

    def generate(messages):
        seen.append(messages)
        return '  "Instruction: Answer yes or no, then explain."\n\nExtra chatter the anchor must not keep.'

    written = self_instruct_anchor(chat_examples[:2], generate, "Rows ({k}):\n{examples}\nWrite the anchor.")
    assert written.text == "Instruction: Answer yes or no, then explain."[len("Instruction: "):]
    assert (written.tries, written.rejected, written.fell_back) == (1, (), False)
    prompt = seen[0][0]["content"]
    assert prompt.startswith("Rows (2):") and "Is water wet?" in prompt and chat_examples[1].answer[:20] in prompt
    with pytest.raises(TellInputError, match="no usable self-instruct anchor in 1 tries \\(empty\\)"):
        self_instruct_anchor(chat_examples[:1], lambda messages: " \n ")


def test_clean_anchor_drops_a_sentence_cut_off_by_the_token_budget():
    from tell.anchor import clean_anchor
    assert clean_anchor("Judge the answer. It must produce a thought field and a") == "Judge the answer."
    assert clean_anchor("Description: Judge it. Reply in JSON.") == "Judge it. Reply in JSON."
    assert clean_anchor("no sentence end at all") == "no sentence end at all"


def test_default_meta_prompt_asks_for_a_description_not_an_answer(chat_examples):
    from tell.anchor import meta_prompt_text
    prompt = meta_prompt_text(chat_examples[:2])
    assert "Describe this task" in prompt and "do not answer the examples" in prompt
    assert "how to answer" not in prompt  # the old prompt asked for instructions, and got an answer


def test_withheld_answer_keeps_the_shape_and_labels_only():
    from tell.anchor import WITHHELD, withheld_answer
    target = '{"thought": "The query asks: \\"Name a river\\". It replies \\"The Nile\\".", "hallucination": "no"}'
    assert json.loads(withheld_answer(target)) == {"thought": WITHHELD, "hallucination": "no"}
    assert withheld_answer("Paris is the capital of France.") == f"Paris is the {WITHHELD}"
    assert withheld_answer("Paris") == "Paris"


def _rows(count: int) -> list[Example]:
    return [Example(f"t:{i}", ({"role": "user", "content": f"question {i}"},
                               {"role": "assistant", "content": f"answer number {i} " + "word " * 10}), "task")
            for i in range(count)]


def test_each_try_shows_other_rows_or_withholds_the_answers_seeded():
    from tell.anchor import shown_rows
    rows = _rows(10)
    first, withheld = shown_rows(rows, 3, 0, seed=42)
    assert first == rows[:3] and not withheld
    second, withheld = shown_rows(rows, 3, 1, seed=42)
    assert len(second) == 3 and not set(e.id for e in second) & {"t:0", "t:1", "t:2"} and not withheld
    assert shown_rows(rows, 3, 1, seed=42) == (second, False)  # seeded
    assert shown_rows(rows, 3, 1, seed=1)[0] != second
    assert shown_rows(rows, 3, 2, seed=42) == (rows[:3], True)
    few, _ = shown_rows(rows[:2], 3, 1, seed=42)  # no other rows: a seeded draw of all of them
    assert sorted(e.id for e in few) == ["t:0", "t:1"]


def test_an_anchor_copying_a_target_is_rejected_then_written_again_or_falls_back():
    from tell.anchor import self_instruct_anchor
    from tell.diagnostics import copied_span
    rows = _rows(6)
    targets = [e.answer for e in rows]
    prompts = []

    def copy_first_shown_answer(messages):  # a model that answers the first example instead of describing it
        prompts.append(messages[0]["content"])
        return messages[0]["content"].split("Output: ", 1)[1].split("\n", 1)[0]

    written = self_instruct_anchor(rows, copy_first_shown_answer, rows=2, tries=3, seed=0,
                                   copied=lambda text: copied_span(text, targets), fallback="### Task: demo")
    # tries 1 and 2 show full answers (copied); try 3 withholds them, and "answer number 0 ..." is not 8 words
    assert written.tries == 3 and not written.fell_back and len(written.rejected) == 2
    assert written.text == "answer number 0 ..."
    assert all(r.startswith('copies a training target ("answer number') for r in written.rejected)
    assert len(set(prompts)) == 3  # each try was asked differently
    fell = self_instruct_anchor(rows, copy_first_shown_answer, rows=2, tries=2, seed=0,
                                copied=lambda text: copied_span(text, targets), fallback="### Task: demo")
    assert (fell.text, fell.tries, fell.fell_back) == ("### Task: demo", 2, True)
    with pytest.raises(TellInputError, match="no usable self-instruct anchor in 2 tries"):
        self_instruct_anchor(rows, copy_first_shown_answer, rows=2, tries=2,
                             copied=lambda text: copied_span(text, targets))


def test_the_tiny_model_writes_another_anchor_after_a_rejection(tiny_model_dir):
    """Greedy decoding repeats itself: a rejected anchor is written again only from another meta prompt."""
    from tell.anchor import self_instruct_anchor
    from tell.config import GenerateConfig, ModelConfig
    from tell.generate import generate_texts, load_for_generation, prompt_texts
    from tell.diagnostics import copied_span, span_words
    run = load_for_generation(None, ModelConfig(name=str(tiny_model_dir), device="cpu"))

    def generate(messages):
        texts = prompt_texts(run, [messages], use_anchor=False)
        return generate_texts(run.model, run.tokenizer, texts, GenerateConfig(greedy=True, batch_size=1), 40,
                              progress=False)[0]

    rows = _rows(8)
    first = self_instruct_anchor(rows, generate, rows=2, tries=1, seed=3)
    assert len(span_words(first.text)) >= 8  # long enough to be caught copying
    # Treat the first anchor as a training target: the same prompt would write it again, so it is rejected.
    again = [self_instruct_anchor(rows, generate, rows=2, tries=3, seed=3,
                                  copied=lambda text: copied_span(text, [first.text]), fallback="fb")
             for _ in range(2)]
    assert again[0] == again[1]  # deterministic: greedy decoding and a seeded choice of rows
    assert again[0].rejected[0].startswith("copies a training target") and again[0].tries >= 2
    assert again[0].text != first.text


@pytest.mark.filterwarnings("ignore:training takes only", "ignore:warmup")
def test_self_instruct_anchor_is_written_by_the_tiny_model_saved_and_reused(tiny_model_dir, task_files,
                                                                           general_file, tmp_path):
    import json

    import yaml
    from tell import cli
    from tell.generate import load_for_generation
    out = tmp_path / "run"
    assert cli.main(["train", "--task", str(task_files["pair"]), "--general", str(general_file), "--model",
                     str(tiny_model_dir), "--anchor-mode", "self-instruct", "--anchor.self_instruct_rows", "2",
                     "--anchor.self_instruct_max_new_tokens", "12", "--ratio", "1", "--batch-size", "2",
                     "--max-steps", "1", "--out", str(out)]) == 0
    anchor = (out / "anchor.txt").read_text(encoding="utf-8")
    assert anchor.strip()
    saved = yaml.safe_load((out / "config.yaml").read_text())["anchor"]
    assert saved["mode"] == "self-instruct" and saved["text"] == anchor
    rows = [json.loads(line) for line in (out / "mix.jsonl").read_text().splitlines()]
    assert all(anchor in r["messages"][-2]["content"] for r in rows if r["source"] == "task")  # trained with it
    assert load_for_generation(str(out)).anchor == anchor  # and applied at inference
