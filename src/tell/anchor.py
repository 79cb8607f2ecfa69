"""Stage 2 — anchor: put the anchor prompt in front of every task row.

In: task examples (or prompt-only message lists) and an AnchorConfig. Out: the same rows with the
anchor before the user content (``user-prefix``) or as the system message (``system``). The same
function is used in training, generation and evaluation, so the anchor is applied identically everywhere.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tell.config import AnchorConfig
from tell.data import Example, TellInputError


def resolve_anchor_text(cfg: AnchorConfig) -> str:
    """Return the anchor text from `text` or `file` (empty string = no anchor)."""
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
