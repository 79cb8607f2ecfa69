"""Stage — tasks (Halu-CoT-JSON training targets): the 'thought' of a HaluEval row, derived from the row.

In: a HaluEval row (``user_query``, ``chatgpt_response``, ``hallucination``, ``hallucination_spans``).
Out: the thought text of its training answer. A "yes" thought quotes the hallucinated spans; a "no" thought
quotes what the query asks and the response's key sentence. Both are built from short fixed phrases (at
most 4 words each, picked per row), so no 8-word span is shared by every target: a constant thought is
what a model learns to copy to every input instead of judging it.
"""
from __future__ import annotations

import re
import zlib

SPAN_MAX_CHARS = 300
QUERY_WORDS = 20
CLAIM_WORDS = 24
# Few fixed words, several phrasings: the row's own words, not the template, make up most of a thought.
ASKS = ("The query asks:", "The user asks:", "The request is:", "Asked:")
SAYS = ("The response says", "The response answers", "It replies", "The answer states")
CONSISTENT = ("That is consistent.", "This fits the query.", "Nothing is unsupported.", "It answers correctly.")
CLAIMS = ("But it claims", "It wrongly states", "Yet the response says", "It asserts")
WRONG = ("That is unsupported.", "This is wrong.", "That is hallucinated.", "These claims are wrong.")
NOTED = ("Also noted:", "A further problem:", "Noted:", "Besides:")
# Openers that say nothing about the query (411 of the 4,007 responses start with "As an AI ...").
_BOILERPLATE = re.compile(r"^(?:(?:sorry|i'm sorry|sure|certainly|of course|yes|no)\s*[,.!:]\s*)?"
                          r"(?:as an ai(?: language model)?\s*,?\s*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9]{4,}")


def _pick(options: tuple[str, ...], row: dict, salt: str) -> str:
    # crc32 of the row's own text: deterministic, independent of Python's hash seed and of any RNG.
    return options[zlib.crc32(f"{salt}:{row['user_query']}".encode()) % len(options)]


def clip_words(text: str, words: int) -> str:
    """Return `text` on one line, cut to its first `words` words (an ellipsis attached to the last)."""
    parts = text.split()
    return " ".join(parts[:words]) + ("…" if len(parts) > words else "")


def clip_chars(text: str) -> str:
    """Return a span stripped and cut to SPAN_MAX_CHARS characters (then "...")."""
    text = text.strip()
    return text if len(text) <= SPAN_MAX_CHARS else text[:SPAN_MAX_CHARS].rstrip() + "..."


def key_sentence(query: str, response: str) -> str:
    """Return the response's key sentence: the one sharing most words (of 4+ letters) with the query,
    the earliest on ties, without an "As an AI language model" opener; sentences of under 3 words are
    used only when there is nothing else."""
    units = [u.strip() for line in response.splitlines() for u in _SENTENCE_END.split(line) if u.strip()]
    units = [_BOILERPLATE.sub("", u).strip() or u for u in units] or [response.strip()]
    asked = set(_WORD.findall(query.lower()))
    scored = [(len(asked & set(_WORD.findall(u.lower()))), len(u.split()) >= 3, -i) for i, u in enumerate(units)]
    best = max(range(len(units)), key=lambda i: (scored[i][1], scored[i][0], scored[i][2]))
    return units[best]


def _quotes(span: str, response: str) -> bool:
    # Annotators sometimes join non-adjacent response lines into one span; each line is a quote.
    return all(line.strip() in response for line in span.splitlines() if line.strip())


def halu_thought(row: dict) -> str:
    """Return the 'thought' of a HaluEval row, built from the row itself.

    Every thought opens with what the query asks (its first QUERY_WORDS words). "no": then the response's
    key sentence (see key_sentence, CLAIM_WORDS words) and that it is consistent. "yes": the quoted
    hallucinated spans (clipped to SPAN_MAX_CHARS) and that they are wrong; spans not found in the
    response are annotator notes ("Incomplete answer") and are listed as such; a "yes" row without
    spans quotes the key sentence and calls it unsupported. Phrasings are picked per row (crc32).
    """
    query = clip_words(row["user_query"].strip().splitlines()[0] if row["user_query"].strip() else "", QUERY_WORDS)
    response = row["chatgpt_response"]
    opening = f'{_pick(ASKS, row, "asks")} "{query}".'
    claim = f'{_pick(SAYS, row, "says")} "{clip_words(key_sentence(row["user_query"], response), CLAIM_WORDS)}".'
    if row["hallucination"] != "yes":
        return f"{opening} {claim} {_pick(CONSISTENT, row, 'consistent')}"
    spans = [s for s in row.get("hallucination_spans") or [] if isinstance(s, str) and s.strip()]
    quoted = [s for s in spans if _quotes(s, response)]
    notes = [s for s in spans if not _quotes(s, response)]
    parts = [opening]
    if quoted:
        parts.append(f"{_pick(CLAIMS, row, 'claims')} " + "; ".join(f'"{clip_chars(s)}"' for s in quoted) + ".")
    if notes:
        parts.append(f"{_pick(NOTED, row, 'noted')} " + "; ".join(clip_chars(s).rstrip(".") for s in notes) + ".")
    if not quoted and not notes:
        parts.append(claim)
    return " ".join(parts) + f" {_pick(WRONG, row, 'wrong')}"
