"""Tests of tell.anchor: user-prefix and system placement, empty anchor, anchor text and file checks."""
from __future__ import annotations

from pathlib import Path

import pytest

from tell.anchor import anchored_examples, anchored_messages, resolve_anchor_text
from tell.config import AnchorConfig
from tell.data import TellInputError, load_examples

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

    anchor = self_instruct_anchor(chat_examples[:2], generate, "Rows ({k}):\n{examples}\nWrite the anchor.")
    assert anchor == "Instruction: Answer yes or no, then explain."[len("Instruction: "):]
    prompt = seen[0][0]["content"]
    assert prompt.startswith("Rows (2):") and "Is water wet?" in prompt and chat_examples[1].answer[:20] in prompt
    with pytest.raises(TellInputError, match="empty self-instruct anchor"):
        self_instruct_anchor(chat_examples[:1], lambda messages: " \n ")


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
