"""Stage 2 — anchor: put the anchor prompt in front of every task row.

In: task examples (or prompt-only message lists) and an AnchorConfig. Out: the same rows with the
anchor before the user content (``user-prefix``) or as the system message (``system``). The same
function is used in training, generation and evaluation, so the anchor is applied identically everywhere.
A self-instruct anchor is written by the model itself from k task rows (``self_instruct_anchor`` takes a
generate callable, so this stage needs no model code).
"""
from __future__ import annotations

from dataclasses import replace
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


def anchored_examples(examples: list[Example], anchor: str, placement: str) -> list[Example]:
    """Return task examples with the anchor applied (unchanged when the anchor is empty)."""
    return [replace(e, messages=anchored_messages(e.messages, anchor, placement)) for e in examples]


DEFAULT_META_PROMPT = (
    "Here are {k} examples of one task, each an input and the expected output.\n\n{examples}\n\n"
    "Write a short instruction (one or two sentences) that names this task and tells an assistant exactly "
    "how to answer it, including the output format. Reply with the instruction only.")
SELF_INSTRUCT_INPUT_CHARS = 600  # a Halu prompt is ~2,000 characters; 3 clipped rows keep the meta prompt ~1e3 tokens
SELF_INSTRUCT_OUTPUT_CHARS = 300
MAX_ANCHOR_CHARS = 600


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " ..."


def meta_prompt_text(examples: list[Example], meta_prompt: str = "") -> str:
    """Return the meta prompt with the task rows (clipped input and output) filled in."""
    blocks = [f"Example {i}\nInput: {_clip(e.prompt_messages[-1]['content'], SELF_INSTRUCT_INPUT_CHARS)}\n"
              f"Output: {_clip(e.answer, SELF_INSTRUCT_OUTPUT_CHARS)}" for i, e in enumerate(examples, 1)]
    return (meta_prompt or DEFAULT_META_PROMPT).replace("{k}", str(len(examples))).replace(
        "{examples}", "\n\n".join(blocks))


def clean_anchor(text: str) -> str:
    """Return a generated anchor cut to its first paragraph, without wrapping quotes or a label."""
    text = _unquote(text.strip().split("\n\n")[0].strip())
    for label in ("Instruction:", "instruction:", "Anchor:"):
        if text.startswith(label):
            text = _unquote(text[len(label):].strip())
    return _clip(text, MAX_ANCHOR_CHARS)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        return text[1:-1].strip()
    return text


def self_instruct_anchor(examples: list[Example], generate: Callable[[tuple[dict, ...]], str],
                         meta_prompt: str = "") -> str:
    """Return the anchor the model writes after reading `examples` (raises if it writes nothing).

    `generate` answers one prompt (a tuple of chat messages) with text, e.g. greedy decoding of the base
    model; the examples should already be the k rows to show.
    """
    if not examples:
        raise TellInputError("self-instruct needs at least one task row", None, None, "anchor.self_instruct_rows")
    anchor = clean_anchor(generate(({"role": "user", "content": meta_prompt_text(examples, meta_prompt)},)))
    if not anchor:
        raise TellInputError("the model wrote an empty self-instruct anchor; give --anchor TEXT or another "
                             "--anchor.meta_prompt", None, None, "anchor.mode")
    return anchor
