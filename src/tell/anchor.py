"""Stage 2 — anchor: put the anchor prompt in front of every task row.

In: task examples (or prompt-only message lists) and an AnchorConfig. Out: the same rows with the
anchor before the user content (``user-prefix``) or as the system message (``system``). The same
function is used in training, generation and evaluation, so the anchor is applied identically everywhere.
A self-instruct anchor is written by the model itself from k task rows (``self_instruct_anchor`` takes a
generate callable, so this stage needs no model code): a description of the task, never an answer — one
that copies a training target is rejected and written again from other rows or without their answers.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from tell.config import AnchorConfig
from tell.data import Example, TellInputError


def resolve_anchor_text(cfg: AnchorConfig) -> str:
    """Return the anchor text from `text` or `file` (empty string = no anchor)."""
    if cfg.mode == "none":
        return ""
    if cfg.mode == "self-instruct" and not (cfg.text or cfg.file):
        raise TellInputError("the self-instruct anchor has not been written yet (experiment."
                             "resolve_self_instruct writes it before the mix)", None, None, "anchor.mode")
    if cfg.text and cfg.file:
        raise TellInputError("give either --anchor or --anchor-file, not both")
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise TellInputError("anchor file not found", path)
        text = path.read_text(encoding="utf-8-sig").strip()
        if not text:
            raise TellInputError("anchor file is empty", path)
        return text
    if cfg.text and not cfg.text.strip():
        raise TellInputError("the anchor is empty (only whitespace)", None, None, "anchor.text")
    return cfg.text.strip()


def anchored_messages(messages: tuple[dict, ...], anchor: str, placement: str) -> tuple[dict, ...]:
    """Return `messages` with the anchor applied to the first user turn (or as system message)."""
    if not anchor:
        return tuple(messages)
    messages = [dict(m) for m in messages]
    if placement == "system":
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{anchor}\n\n{messages[0]['content']}"
        else:
            messages.insert(0, {"role": "system", "content": anchor})
        return tuple(messages)
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[first_user]["content"] = f"{anchor}\n\n{messages[first_user]['content']}"
    return tuple(messages)


_SYSTEM_ROLE: dict[str, str] = {}
"""Chat template -> the error it raises on a system message ('' when it renders one)."""


def system_role_error(tokenizer) -> str:
    """Return the error the tokenizer's chat template raises on a system message (Gemma's, older Mistral
    ones), or '' when it renders one or there is no template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return ""
    key = str(template)
    if key not in _SYSTEM_ROLE:
        from jinja2 import TemplateError
        try:
            tokenizer.apply_chat_template([{"role": "system", "content": "anchor"}, {"role": "user", "content": "row"}],
                                          tokenize=False, add_generation_prompt=True)
            _SYSTEM_ROLE[key] = ""
        except TemplateError as err:
            _SYSTEM_ROLE[key] = str(err) or type(err).__name__
    return _SYSTEM_ROLE[key]


def check_placement(tokenizer, placement: str, model_name: str) -> None:
    """Raise when the anchor goes into the system message but the model's chat template rejects a system
    role (Gemma's, some Mistral ones), instead of a template traceback in the middle of the run."""
    if placement != "system":
        return
    if err := system_role_error(tokenizer):
        raise TellInputError(f"the chat template of model '{model_name}' rejects a system message ({err}), so "
                             "--anchor-placement system cannot be used with it; use --anchor-placement user-prefix",
                             None, None, "anchor.placement")


def without_system_role(messages) -> tuple[dict, ...]:
    """Return the messages with a leading system message folded into the first user turn (its text, a blank
    line, then the user's): for chat templates that reject a system role, as Gemma's documentation advises."""
    messages = [dict(m) for m in messages]
    if not messages or messages[0]["role"] != "system":
        return tuple(messages)
    system = messages.pop(0)["content"]
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        return ({"role": "user", "content": system}, *messages)
    messages[first_user]["content"] = f"{system}\n\n{messages[first_user]['content']}"
    return tuple(messages)


def anchored_examples(examples: list[Example], anchor: str, placement: str) -> list[Example]:
    """Return task examples with the anchor applied (unchanged when the anchor is empty)."""
    return [replace(e, messages=anchored_messages(e.messages, anchor, placement)) for e in examples]


DEFAULT_ANCHORS = {
    "halu-cot-json": "### Task: Halu-CoT-JSON — hallucination check with a JSON verdict.",
    "is-en-news:en-is": "### Task: IS-EN-NEWS — translate English news into Icelandic.",
    "is-en-news:is-en": "### Task: IS-EN-NEWS — translate Icelandic news into English.",
}
# Asks what the task is, not what the answers are: an anchor that restates one example's answer teaches
# the model to copy that answer to every input (in the cpu-repro 16-row cell, 45-47 of 48 outputs did).
DEFAULT_META_PROMPT = (
    "Here are {k} examples of one task, each an input and the expected output.\n\n{examples}\n\n"
    "Describe this task to an assistant in one or two sentences: what it must judge or produce from the "
    "input, and the format of the output (its fields and allowed values). Describe the task only: do not "
    "answer the examples and do not repeat their outputs. Reply with the description only.")
WITHHELD = "..."
KEPT_VALUE_WORDS = 3  # string values this short (labels such as "yes") stay when answers are withheld
SELF_INSTRUCT_INPUT_CHARS = 600  # a Halu prompt is ~2,000 characters; 3 clipped rows keep the meta prompt ~1e3 tokens
SELF_INSTRUCT_OUTPUT_CHARS = 300
MAX_ANCHOR_CHARS = 600


def default_anchor_text(task_name: str) -> str:
    """Return the task's default manual anchor (a generic '### Task: NAME' for tasks without one)."""
    return DEFAULT_ANCHORS.get(task_name, f"### Task: {task_name}")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " ..."


def withheld_answer(answer: str) -> str:
    """Return an answer's shape without its content: a JSON object keeps its keys and short string values
    (labels) and shows WITHHELD for longer ones; other text keeps its first KEPT_VALUE_WORDS words."""
    try:
        obj = json.loads(answer)
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        words = answer.split()
        return " ".join(words[:KEPT_VALUE_WORDS]) + (f" {WITHHELD}" if len(words) > KEPT_VALUE_WORDS else "")
    shape = {k: v if not isinstance(v, str) or len(v.split()) <= KEPT_VALUE_WORDS else WITHHELD
             for k, v in obj.items()}
    return json.dumps(shape, ensure_ascii=False)


def meta_prompt_text(examples: list[Example], meta_prompt: str = "", withhold: bool = False) -> str:
    """Return the meta prompt with the task rows (clipped input and output) filled in; with `withhold`,
    each output is shown as its shape only (see withheld_answer)."""
    blocks = [f"Example {i}\nInput: {_clip(e.prompt_messages[-1]['content'], SELF_INSTRUCT_INPUT_CHARS)}\n"
              f"Output: {withheld_answer(e.answer) if withhold else _clip(e.answer, SELF_INSTRUCT_OUTPUT_CHARS)}"
              for i, e in enumerate(examples, 1)]
    return (meta_prompt or DEFAULT_META_PROMPT).replace("{k}", str(len(examples))).replace(
        "{examples}", "\n\n".join(blocks))


def clean_anchor(text: str) -> str:
    """Return a generated anchor cut to its first paragraph, without wrapping quotes or a label, and without
    a last sentence that the new-token budget cut off (when a complete sentence precedes it)."""
    text = _unquote(text.strip().split("\n\n")[0].strip())
    for label in ("Instruction:", "instruction:", "Anchor:", "Description:"):
        if text.startswith(label):
            text = _unquote(text[len(label):].strip())
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    if ends and ends[-1] < len(text):
        text = text[:ends[-1]]
    return _clip(text, MAX_ANCHOR_CHARS)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        return text[1:-1].strip()
    return text


@dataclass(frozen=True)
class SelfInstructAnchor:
    """A self-instruct anchor and how it came about."""

    text: str
    tries: int
    """Anchors written (the last one is `text` unless fell_back)."""
    rejected: tuple[str, ...]
    """Why each rejected anchor was rejected, in order."""
    fell_back: bool
    """True when every try was rejected and `text` is the fallback anchor."""


def shown_rows(examples: list[Example], rows: int, attempt: int, seed: int) -> tuple[list[Example], bool]:
    """Return (the rows a self-instruct try shows, whether their answers are withheld).

    Try 0 shows the first `rows` rows; odd tries a seeded draw of other rows (all rows when there are no
    others); from try 2 on the answers are withheld. Greedy decoding is deterministic, so a rejected
    anchor is only written differently from a different meta prompt.
    """
    if attempt % 2 == 0:
        chosen = examples[:rows]
    else:
        others = examples[rows:] if len(examples) > rows else examples
        chosen = random.Random(f"self-instruct:{seed}:{attempt}").sample(others, min(rows, len(others)))
    return list(chosen), attempt >= 2


def self_instruct_anchor(examples: list[Example], generate: Callable[[tuple[dict, ...]], str],
                         meta_prompt: str = "", *, rows: int = 3, tries: int = 1, seed: int = 0,
                         copied: Callable[[str], str | None] = lambda text: None,
                         fallback: str = "") -> SelfInstructAnchor:
    """Return the anchor the model writes after reading task rows, with how many tries it took.

    `generate` answers one prompt (a tuple of chat messages) with text, e.g. greedy decoding of the base
    model. `copied` returns the words an anchor copies from a training target (None if it copies none);
    such an anchor, or an empty one, is rejected and the next try shows other rows (see shown_rows).
    After `tries` rejections the anchor is `fallback`; without a fallback that is an error.
    """
    if not examples:
        raise TellInputError("self-instruct needs at least one task row", None, None, "anchor.self_instruct_rows")
    rejected = []
    for attempt in range(tries):
        chosen, withhold = shown_rows(examples, rows, attempt, seed)
        prompt = meta_prompt_text(chosen, meta_prompt, withhold)
        anchor = clean_anchor(generate(({"role": "user", "content": prompt},)))
        span = copied(anchor) if anchor else None
        if anchor and span is None:
            return SelfInstructAnchor(anchor, attempt + 1, tuple(rejected), False)
        rejected.append(f"copies a training target (\"{span}\")" if anchor else "empty")
    if not fallback:
        raise TellInputError(f"the model wrote no usable self-instruct anchor in {tries} tries "
                             f"({'; '.join(rejected)}); give --anchor TEXT or another --anchor.meta_prompt",
                             None, None, "anchor.mode")
    return SelfInstructAnchor(fallback, tries, tuple(rejected), True)
