"""Stage 1 — data: read local .json/.jsonl rows and normalise them to chat examples.

In: a path (or a built-in name such as ``alpaca``, or a datasets hub name) and a field map.
Out: ``list[Example]``, each a tuple of chat messages ending in the assistant answer, carrying the
file and line it came from so that every later error can point back at the input.
Three row shapes are accepted: Alpaca (instruction/input/output), pairs (prompt|query + response|output)
and chat (messages with roles). The built-in ``sharegpt`` pool (2.8e7 tokens) is an ``IndexedPool``
instead (sharegpt.py): a byte-offset index of its conversations, read from the file only when drawn.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

DATASETS_DIR = Path(__file__).parent / "datasets"
BUILTIN_GENERAL = {
    # 999 Alpaca rows (~1.7e5 SmolLM2 tokens) from LLaMA-Factory's data/ folder.
    "alpaca": (DATASETS_DIR / "alpaca_en_demo.json",),
    # Alpaca rows plus the 300 `chosen` answers of LLaMA-Factory's DPO demo (~+2.5e5 tokens).
    "alpaca+dpo": (DATASETS_DIR / "alpaca_en_demo.json", DATASETS_DIR / "dpo_en_demo.json"),
}
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def cache_dir() -> Path:
    """Return tell's cache directory: $TELL_CACHE, else ~/.cache/tell."""
    return Path(os.environ.get("TELL_CACHE", Path.home() / ".cache" / "tell"))


class TellInputError(ValueError):
    """Bad user input, reported with the file, line and field it concerns."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        where = ""
        if file is not None:
            where = f"{file}"
            if line:
                where += f":{line}"
            if field:
                where += f" (field '{field}')"
            where += ": "
        elif field:
            where = f"{field}: "  # e.g. 'mix.ratio: ...' for errors about a setting rather than a file
        super().__init__(where + message)
        self.file, self.line, self.field = (str(file) if file else None), line, field


@dataclass(frozen=True)
class Example:
    """One chat row; `messages` ends with the assistant answer (the only trained part)."""

    id: str
    messages: tuple[dict, ...]
    source: str = "task"
    file: str = ""
    line: int = 0

    @property
    def prompt_messages(self) -> tuple[dict, ...]:
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class FieldMap:
    """Names of the fields read from each row shape; override for unusual files."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    prompt: tuple[str, ...] = ("prompt", "query")
    response: tuple[str, ...] = ("response", "output")
    messages: str = "messages"
    system: str = "system"
    extra: dict = field(default_factory=dict)


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """Return (line number, record) pairs from a .json (a list) or .jsonl file, validated as objects."""
    return [(line, rec) for line, rec, _ in read_raw_records(path)]


def read_raw_records(path: str | Path) -> list[tuple[int, dict, str]]:
    """Return (line number, record, the row's own JSON text) triples, validated as in read_records.

    The text is the row exactly as the file holds it: the line of a .jsonl row (without its line end), the
    object of a .json list with the line breaks between its tokens removed (JSON strings hold none), so
    each fits on one JSONL line with every field, number and escape as written.
    """
    path = Path(path)
    if not path.exists():
        raise TellInputError("file not found", path)
    if path.is_dir():
        raise TellInputError("is a directory, expected a .json or .jsonl file", path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is valid UTF-8 that editors add
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise TellInputError(f"not valid UTF-8 (byte {err.start})", path, line) from None
    if "\x00" in text:
        raise TellInputError("looks like a binary file (NUL bytes), expected JSON text", path,
                             text[: text.index("\x00")].count("\n") + 1)
    if not text.strip():
        raise TellInputError("file is empty", path)
    is_array = text.lstrip().startswith("[") or (path.suffix == ".json" and _is_one_json_value(text))
    records = _parse_json_array(text, path) if is_array else _parse_jsonl(text, path)
    if not records:
        raise TellInputError("file has no rows", path)
    for line, rec, _ in records:
        if not isinstance(rec, dict):
            raise TellInputError(f"row is a {type(rec).__name__}, expected a JSON object", path, line)
    return records


def _is_one_json_value(text: str) -> bool:
    """Return True when the text is one JSON document (a .json object), not JSON lines."""
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_error(err: json.JSONDecodeError) -> str:
    """Return 'malformed JSON: <reason> at column N' (some of json's reasons already end in "at")."""
    reason = err.msg[:-3] if err.msg.endswith(" at") else err.msg
    return f"malformed JSON: {reason} at column {err.colno}"


def _parse_jsonl(text: str, path: Path) -> list[tuple[int, object, str]]:
    records = []
    # split("\n"), not splitlines(): U+2028, U+0085 etc. are legal raw inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line), line.rstrip("\r")))
        except json.JSONDecodeError as err:
            raise TellInputError(_json_error(err), path, number) from None
    return records


def _parse_json_array(text: str, path: Path) -> list[tuple[int, object, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TellInputError(_json_error(err), path, err.lineno) from None
    if not isinstance(data, list):
        raise TellInputError("a .json file must hold a list of rows", path, 1)
    # json.loads loses positions; find each top-level object's line and text with a raw decoder.
    decoder, lines, texts, pos = json.JSONDecoder(), [], [], text.index("[") + 1
    for _ in data:
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, end = decoder.raw_decode(text, pos)
        texts.append(text[pos:end].replace("\r", "").replace("\n", ""))
        pos = end
    return list(zip(lines, data, texts))


def with_empty_answer(rec: dict, fields: "FieldMap") -> dict:
    """Return a prompt-only row (no assistant answer yet) with an empty answer added, so it reads like a full
    row of its shape; a row that has an answer is returned as it is."""
    key = fields.messages if fields.messages in rec else "conversations" if "conversations" in rec else None
    if key is not None:
        turns = rec[key]
        last = turns[-1] if isinstance(turns, list) and turns else None
        if isinstance(last, dict) and last.get("role", last.get("from")) not in ("assistant", "gpt") \
                and not isinstance(rec.get("chosen"), dict):
            return {**rec, key: turns + [{"role": "assistant", "content": ""}]}
        return rec
    if fields.instruction in rec:
        return rec if fields.output in rec else {**rec, fields.output: ""}
    if any(k in rec for k in fields.prompt) and not any(k in rec for k in fields.response):
        return {**rec, fields.response[0]: ""}
    return rec


def _text_field(rec: dict, name: str, path, line, required: bool = True) -> str | None:
    value = rec.get(name)
    if value is None:
        if required:
            why = "is null" if name in rec else "is missing"
            raise TellInputError(f"required field {why}", path, line, name)
        return None
    if not isinstance(value, str):
        raise TellInputError(f"expected a string, got {type(value).__name__}", path, line, name)
    return value


def record_to_messages(rec: dict, fields: FieldMap, path, line) -> tuple[dict, ...]:
    """Return the chat messages of one row in any of the three shapes (chat, Alpaca, pair)."""
    if fields.messages in rec or "conversations" in rec:
        return _chat_messages(rec, fields, path, line)
    if fields.instruction in rec:
        instruction = _text_field(rec, fields.instruction, path, line)
        extra = _text_field(rec, fields.input, path, line, required=False) or ""
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        answer = _text_field(rec, fields.output, path, line)
        return _with_system(rec, fields, path, line) + (
            {"role": "user", "content": user}, {"role": "assistant", "content": answer})
    prompt_key = next((k for k in fields.prompt if k in rec), None)
    answer_key = next((k for k in fields.response if k in rec), None)
    if prompt_key is None or answer_key is None:
        missing = fields.prompt if prompt_key is None else fields.response
        raise TellInputError(
            f"row matches no known shape: need '{fields.messages}', or '{fields.instruction}'+"
            f"'{fields.output}', or one of {list(fields.prompt)} + one of {list(fields.response)}; "
            f"keys present: {sorted(rec)}", path, line, "|".join(missing))
    return _with_system(rec, fields, path, line) + (
        {"role": "user", "content": _text_field(rec, prompt_key, path, line)},
        {"role": "assistant", "content": _text_field(rec, answer_key, path, line)})


def _with_system(rec, fields, path, line) -> tuple[dict, ...]:
    system = _text_field(rec, fields.system, path, line, required=False)
    return ({"role": "system", "content": system},) if system else ()


def _chat_messages(rec: dict, fields: FieldMap, path, line) -> tuple[dict, ...]:
    key = fields.messages if fields.messages in rec else "conversations"
    turns = rec[key]
    if not isinstance(turns, list) or not turns:
        raise TellInputError("expected a non-empty list of messages", path, line, key)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise TellInputError(f"message {i} is not an object", path, line, key)
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = _SHAREGPT_ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise TellInputError(f"message {i} has unknown role {turn.get('role', turn.get('from'))!r};"
                                 f" expected one of {list(ROLES)}", path, line, f"{key}[{i}].role")
        if not isinstance(content, str):
            raise TellInputError(f"message {i} content must be a string", path, line, f"{key}[{i}].content")
        messages.append({"role": role, "content": content})
    chosen = rec.get("chosen")  # ShareGPT preference rows: the chosen answer ends the chat
    if isinstance(chosen, dict) and messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": chosen.get("value", chosen.get("content", ""))})
    if messages[-1]["role"] != "assistant":
        raise TellInputError("the last message must be the assistant's answer", path, line, key)
    if not any(m["role"] == "user" for m in messages):
        raise TellInputError("no user message", path, line, key)
    return tuple(messages)


def load_examples(spec: str | Path, source: str, fields: FieldMap = FieldMap()) -> Sequence[Example]:
    """Return the examples of a local file, a built-in set (``alpaca``; ``sharegpt`` as an IndexedPool)
    or a `datasets` hub name."""
    if str(spec) == "sharegpt":
        from tell.sharegpt import sharegpt_pool
        return sharegpt_pool(source)
    paths = BUILTIN_GENERAL.get(str(spec))
    if paths is None and not Path(spec).exists() and not _looks_like_path(str(spec)):
        return _load_hub_dataset(str(spec), source, fields)
    examples = []
    for path in paths or (Path(spec),):
        for line, rec in read_records(path):
            messages = record_to_messages(rec, fields, path, line)
            examples.append(Example(f"{source}:{Path(path).name}:{line}", messages, source, str(path), line))
    return examples


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".json", ".jsonl")) or spec.startswith((".", "/", "~"))


def _load_hub_dataset(name: str, source: str, fields: FieldMap) -> list[Example]:
    # Untested offline by design: machines here reach no hub, so this is a thin pass-through.
    try:
        import datasets
        rows = datasets.load_dataset(name, split="train")
    except Exception as err:  # noqa: BLE001 - surface any hub failure as input error
        raise TellInputError(f"not a local file, and datasets.load_dataset failed: {err}", name) from None
    return [Example(f"{source}:{name}:{i + 1}", record_to_messages(dict(r), fields, name, i + 1),
                    source, name, i + 1) for i, r in enumerate(rows)]


def with_source(examples: list[Example], source: str) -> list[Example]:
    """Return the examples relabelled as coming from `source` (task or general)."""
    return [replace(e, source=source) for e in examples]
