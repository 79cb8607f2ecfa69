"""Stage 3 — mix: the token-budgeted extensive shuffle.

In: anchored task examples, the general pool, a MixConfig and a tokenizer. Out: a ``Mix`` — the
ordered rows with their token counts — and its manifest. The general:task ratio is counted in tokens
of the fully rendered rows (chat template applied, prompt + answer). General rows are drawn seeded
without replacement until the ratio is reached, then all rows are ordered (default: uniform shuffle).
"""
from __future__ import annotations

import bisect
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tell.anchor import system_role_error, without_system_role
from tell.config import MixConfig
from tell.data import Example, TellInputError

# For tokenizers that have no chat template (base models). Each turn's text starts on a new line: a prompt
# ending in "assistant: " would be tokenized apart from the answer's first word, which the rendered row
# merges with that space (" Red"), so training and generation would see different tokens there.
PLAIN_TEMPLATE = "{role}:\n{content}\n"
PLAIN_ANSWER = "assistant:\n"


@dataclass(frozen=True)
class Encoded:
    """Token ids of a rendered row and the [start, end) token spans of its assistant turns (the trained part)."""

    input_ids: tuple[int, ...]
    label_spans: tuple[tuple[int, int], ...]

    @property
    def prompt_tokens(self) -> int:
        """Tokens before the last answer."""
        return self.label_spans[-1][0] if self.label_spans else len(self.input_ids)


@dataclass(frozen=True)
class MixRow:
    example: Example
    tokens: int
    truncated: bool = False


@dataclass(frozen=True)
class Mix:
    rows: tuple[MixRow, ...]
    manifest: dict = field(default_factory=dict)


def render_prompt(tokenizer, messages) -> str:
    """Return the prompt text (chat template + generation prompt) for prompt-only messages.

    Without a chat template (a base model such as Llama-2-7b-hf) the plain template is used, opened with the
    tokenizer's BOS token as its pretraining saw every document begin (rows are tokenized without special
    tokens, so nothing else adds it).
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(_templated(tokenizer, messages), tokenize=False, add_generation_prompt=True)
    return (tokenizer.bos_token or "") + "".join(PLAIN_TEMPLATE.format(**m) for m in messages) + PLAIN_ANSWER


def _templated(tokenizer, messages) -> list[dict]:
    """Return the messages for the chat template: a row's own system message is folded into its user turn
    where the template rejects a system role (Gemma), rather than failing on it (an anchor asked to go into
    the system message is refused before, by anchor.check_placement)."""
    if messages and messages[0]["role"] == "system" and system_role_error(tokenizer):
        return list(without_system_role(messages))
    return list(messages)


def _render_full(tokenizer, messages) -> str:
    """Return the whole rendered row; without a chat template the answer ends with the EOS token, so that
    training teaches a base model to stop (a chat template closes each turn itself)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(_templated(tokenizer, messages), tokenize=False)
    *earlier, answer = messages
    return render_prompt(tokenizer, earlier) + answer["content"] + (tokenizer.eos_token or "")


def token_counts(tokenizer, examples) -> list[int]:
    """Return the token count of each fully rendered example (prompt + every answer)."""
    fulls = [_render_full(tokenizer, e.messages) for e in examples]
    return [len(ids) for ids in tokenizer(fulls, add_special_tokens=False)["input_ids"]] if fulls else []


def answer_char_spans(tokenizer, messages, full: str) -> list[tuple[int, int]]:
    """Return the [start, end) characters of `full` (the rendered conversation) that each assistant turn
    covers: its answer and end-of-turn tokens; the last turn runs to the end of `full`.

    An earlier turn's span comes from rendering the conversation up to it. A template whose shorter renders
    are not prefixes of the whole (one that rewrites earlier turns) has its last answer trained only.
    """
    last = len(messages) - 1
    final = (len(render_prompt(tokenizer, messages[:last])), len(full))
    spans = []
    for k in range(last):
        if messages[k]["role"] != "assistant":
            continue
        prompt, turn = render_prompt(tokenizer, messages[:k]), _render_full(tokenizer, messages[:k + 1])
        if not (full.startswith(prompt) and full.startswith(turn)):
            return [final]
        spans.append((len(prompt), len(turn)))
    return spans + [final]


def encode_examples(tokenizer, examples: list[Example]) -> list[Encoded]:
    """Return token ids of each fully rendered example and the token spans of its assistant turns.

    A token is trained when it starts inside an answer's characters (answer_char_spans): found through the
    fast tokenizer's offsets, or, for a slow tokenizer, by tokenizing the text before each boundary.
    """
    fulls = [_render_full(tokenizer, e.messages) for e in examples]
    if not fulls:
        return []
    fast = getattr(tokenizer, "is_fast", False)
    batch = tokenizer(fulls, add_special_tokens=False, return_offsets_mapping=fast)
    encoded = []
    for i, (e, full) in enumerate(zip(examples, fulls)):
        ids = tuple(batch["input_ids"][i])
        if fast:
            starts = [a for a, _ in batch["offset_mapping"][i]]
            index = lambda char: bisect.bisect_left(starts, char)  # noqa: E731 - first token starting at char
        else:
            index = lambda char: len(tokenizer(full[:char], add_special_tokens=False)["input_ids"])  # noqa: E731
        spans = [(index(a), len(ids) if b == len(full) else index(b))
                 for a, b in answer_char_spans(tokenizer, e.messages, full)]
        encoded.append(Encoded(ids, tuple((a, b) for a, b in spans if b > a)))
    return encoded


def _check_lengths(examples, lengths, max_length, on_long) -> tuple[list, list, int, int]:
    """Return (kept examples, their token counts, skipped count, truncated count) under on_long."""
    kept, kept_lengths, skipped, truncated = [], [], 0, 0
    for example, tokens in zip(examples, lengths):
        if tokens > max_length:
            if on_long == "error":
                raise _too_long(tokens, max_length, example)
            if on_long == "skip":
                skipped += 1
                continue
            truncated += 1
        kept.append(example)
        kept_lengths.append(tokens)
    return kept, kept_lengths, skipped, truncated


def _too_long(tokens: int, max_length: int, example: Example) -> TellInputError:
    return TellInputError(f"row has {tokens} tokens, more than max_length {max_length}; use --on-long "
                          "skip|truncate or a larger --max-length", example.file, example.line)


def parse_ratio(ratio: str) -> float | None:
    """Return the ratio as a float, or None for 'max' (the whole pool)."""
    if str(ratio) == "max":
        return None
    value = float(ratio)
    if not 0 <= value < math.inf:  # inf would draw forever with allow_repeat; nan would draw nothing
        raise TellInputError(f"ratio must be a finite number >= 0, got {ratio}", None, None, "mix.ratio")
    return value


PREFETCH_ROWS = 64  # rows of an indexed pool tokenized in one batch (2.5x faster than one at a time)
FILL_WINDOW = 256  # rows of an indexed pool, after where the draw stops, that may close the last gap


class DrawnLengths(Sequence):
    """Token counts of an IndexedPool's rows, read and tokenized only when the draw reaches them.

    Item i is row i's token count under on_long (None: skipped, not drawable; truncate: max_length; error:
    raises, naming the row's file and line), so a draw of N tokens tokenizes ~N tokens of the pool, not all.
    """

    def __init__(self, pool, tokenizer, max_length: int, on_long: str):
        self.pool, self.tokenizer, self.max_length, self.on_long = pool, tokenizer, max_length, on_long
        self.examples, self.counts, self.skipped, self.truncated = {}, {}, set(), set()

    def __len__(self) -> int:
        return len(self.pool)

    def prefetch(self, indices) -> None:
        """Tokenize the rows of `indices` not counted yet, in one batch."""
        new = [i for i in indices if i not in self.counts]
        examples = self.pool.examples(new) if new else []
        for i, example, tokens in zip(new, examples, token_counts(self.tokenizer, examples)):
            self.examples[i], self.counts[i] = example, tokens

    def __getitem__(self, i: int) -> int | None:
        self.prefetch([i])
        tokens = self.counts[i]
        if tokens <= self.max_length:
            return tokens
        if self.on_long == "error":
            raise _too_long(tokens, self.max_length, self.examples[i])
        (self.skipped if self.on_long == "skip" else self.truncated).add(i)
        return None if self.on_long == "skip" else self.max_length


def draw_general(pool_tokens: Sequence[int | None], target_tokens: float | None, seed: int,
                 allow_repeat: bool, fill_window: int | None = None) -> tuple[list[int], int]:
    """Return (indices into the pool, number of repeated draws) summing to ≈ target tokens.

    The draw walks a seeded permutation of the pool and stops before the first row that would overshoot the
    target by more than it fills; then the one unused row that best closes the gap is added, chosen from the
    whole pool or, with `fill_window`, from the next rows of the permutation. pool_tokens[i] is None for a
    row that may not be drawn; it is read only as far as the draw goes, and a lazy sequence may define
    ``prefetch(indices)`` to count the next rows in one batch (DrawnLengths).
    """
    rng = random.Random(f"{seed}-draw")
    prefetch = getattr(pool_tokens, "prefetch", None) or (lambda indices: None)
    size = len(pool_tokens)
    if target_tokens is None:
        order = list(range(size))
        rng.shuffle(order)
        for start in range(0, size, PREFETCH_ROWS):
            prefetch(order[start:start + PREFETCH_ROWS])
        return [i for i in order if pool_tokens[i] is not None], 0
    chosen, total, repeats, used, rest = [], 0, 0, set(), []
    while total < target_tokens:
        order = list(range(size))
        rng.shuffle(order)
        for position, i in enumerate(order):
            if position % PREFETCH_ROWS == 0:
                prefetch(order[position:position + PREFETCH_ROWS])
            if pool_tokens[i] is None:
                continue
            if total + pool_tokens[i] / 2 >= target_tokens:
                rest = order[position:] if fill_window is None else order[position:position + fill_window]
                break  # adding this row would overshoot by more than it fills
            repeats += i in used
            chosen.append(i)
            used.add(i)
            total += pool_tokens[i]
        else:
            if not allow_repeat and total < target_tokens:  # the pool's last row may have crossed the target
                pool_total = sum(t for t in (pool_tokens[i] for i in range(size)) if t is not None)
                raise TellInputError(
                    f"the general pool has {size} rows / {pool_total} tokens, fewer than "
                    f"the {int(target_tokens)} tokens the ratio asks for; lower --ratio, use --ratio max, "
                    "give a larger --general set, or pass --allow-repeat", None, None, "mix.ratio")
            continue
        break
    prefetch(rest)
    return chosen + _best_fill(pool_tokens, [i for i in rest if i not in used], target_tokens - total), repeats


def _best_fill(pool_tokens, candidates: list[int], gap: float) -> list[int]:
    """Return [the candidate row that best closes the remaining gap], if it brings us closer."""
    candidates = [i for i in candidates if pool_tokens[i] is not None]
    if gap <= 0 or not candidates:
        return []
    best = min(candidates, key=lambda i: (abs(gap - pool_tokens[i]), i))
    return [best] if abs(gap - pool_tokens[best]) < gap else []


def ordered_rows(task: list[MixRow], general: list[MixRow], order: str, seed: int) -> list[MixRow]:
    """Return task and general rows in the training order named by `order`."""
    rng = random.Random(f"{seed}-order")
    if order == "random":
        rows = task + general
        rng.shuffle(rows)
        return rows
    task, general = task[:], general[:]
    rng.shuffle(task)
    rng.shuffle(general)
    if order == "task-first":
        return task + general
    if order == "task-last":
        return general + task
    total = len(task) + len(general)  # spread: task row i at the middle of its 1/len(task) slice
    slots = {int((i + 0.5) * total / len(task)): row for i, row in enumerate(task)} if task else {}
    rest = iter(general)
    return [slots[p] if p in slots else next(rest) for p in range(total)]


def build_mix(task: list[Example], general: Sequence[Example], cfg: MixConfig, tokenizer,
              max_length: int, tokenizer_name: str = "") -> Mix:
    """Return the ordered mix of task rows and a token-budget draw of general rows, with its manifest.

    The budget is cfg.general_tokens, else cfg.ratio × the task tokens. A general pool given as a list is
    tokenized whole (its size and long rows are known up front); an IndexedPool only as far as the draw goes.
    """
    ratio = parse_ratio(cfg.ratio)
    if not task:
        raise TellInputError("the task set is empty", None, None, "data.task")
    task, task_lengths, task_skipped, task_trunc = _check_lengths(
        task, token_counts(tokenizer, task), max_length, cfg.on_long)
    if not task:
        raise TellInputError(f"every task row is longer than max_length {max_length}", None, None, "data.task")
    task_rows = [MixRow(e, min(n, max_length), n > max_length) for e, n in zip(task, task_lengths)]
    task_tokens = sum(r.tokens for r in task_rows)
    target = cfg.general_tokens or (None if ratio is None else ratio * task_tokens)
    general_rows, pool = [], {"general_pool_rows": len(general), "general_pool_tokens": 0, "general_repeats": 0,
                              "skipped": 0, "truncated": 0}
    if cfg.mode != "sft":
        if not general:
            raise TellInputError("the general pool is empty", None, None, "data.general")
        draw = _draw_from_list if isinstance(general, list) else _draw_from_index
        general_rows, pool = draw(general, target, cfg, tokenizer, max_length)
    general_tokens = sum(r.tokens for r in general_rows)
    trained_task = [] if cfg.mode == "general" else task_rows
    rows = ordered_rows(trained_task, general_rows, cfg.order, cfg.seed)
    achieved = general_tokens / task_tokens
    budget = {"general_tokens_requested": cfg.general_tokens} if cfg.general_tokens else {}
    requested = round(cfg.general_tokens / task_tokens, 6) if cfg.general_tokens else ratio
    manifest = {
        "mode": cfg.mode, "order": cfg.order, "seed": cfg.seed,
        "tokenizer": tokenizer_name or getattr(tokenizer, "name_or_path", "?"),
        "task_rows": len(trained_task), "general_rows": len(general_rows),
        "task_tokens": sum(r.tokens for r in trained_task), "general_tokens": general_tokens, **budget,
        "budget_task_tokens": task_tokens,
        "ratio_requested": "max" if requested is None else (0.0 if cfg.mode == "sft" else requested),
        "ratio": round(achieved, 6),
        "ratio_note": _ratio_note(ratio, achieved, cfg, pool["general_pool_tokens"], general_tokens),
        **{k: v for k, v in pool.items() if k not in ("skipped", "truncated")},
        "max_length": max_length, "on_long": cfg.on_long,
        "skipped_long": {"task": task_skipped, "general": pool["skipped"]},
        "truncated_long": {"task": task_trunc, "general": pool["truncated"]},
        "task_positions": [i for i, r in enumerate(rows) if r.example.source == "task"],
    }
    return Mix(tuple(rows), manifest)


def _draw_from_list(general: list[Example], target, cfg: MixConfig, tokenizer, max_length) -> tuple[list, dict]:
    """Return (drawn rows, pool facts) of a pool held in memory, tokenized whole."""
    general, lengths, skipped, truncated = _check_lengths(
        general, token_counts(tokenizer, general), max_length, cfg.on_long)
    tokens = [min(n, max_length) for n in lengths]
    indices, repeats = draw_general(tokens, target, cfg.seed, cfg.allow_repeat)
    rows = [MixRow(general[i], tokens[i], lengths[i] > max_length) for i in indices]
    return rows, {"general_pool_rows": len(general), "general_pool_tokens": sum(tokens), "general_repeats": repeats,
                  "skipped": skipped, "truncated": truncated}


def _draw_from_index(pool, target, cfg: MixConfig, tokenizer, max_length) -> tuple[list, dict]:
    """Return (drawn rows, pool facts) of an IndexedPool, tokenizing only the rows the draw reaches.

    Skipped counts the rows the draw reached and passed over, truncated the drawn rows that were cut; the
    pool's token total is known only when every row was reached (ratio max), else None.
    """
    lengths = DrawnLengths(pool, tokenizer, max_length, cfg.on_long)
    indices, repeats = draw_general(lengths, target, cfg.seed, cfg.allow_repeat, FILL_WINDOW)
    rows = [MixRow(lengths.examples[i], lengths[i], i in lengths.truncated) for i in indices]
    counted = len(lengths.counts) == len(pool)
    return rows, {"general_pool_rows": len(pool),
                  "general_pool_tokens": sum(min(n, max_length) for i, n in lengths.counts.items()
                                             if i not in lengths.skipped) if counted else None,
                  "general_repeats": repeats, "general_pool": {"name": pool.name, **pool.facts},
                  "general_rows_tokenized": len(lengths.counts),
                  "skipped": len(lengths.skipped), "truncated": sum(r.truncated for r in rows)}


def _ratio_note(ratio, achieved, cfg: MixConfig, pool_tokens, general_tokens) -> str:
    if cfg.mode == "sft":
        return "mode sft: no general rows"
    if cfg.general_tokens:
        error = abs(general_tokens - cfg.general_tokens) / cfg.general_tokens
        return f"{error:.2%} off the requested {cfg.general_tokens} general tokens (whole rows)"
    if ratio is None:
        return f"ratio max: the whole pool ({pool_tokens} tokens)"
    if ratio == 0:
        return "ratio 0: no general rows"
    error = abs(achieved - ratio) / ratio
    if error <= 0.01:
        return f"within {error:.2%} of the requested ratio"
    return (f"{error:.1%} off the requested ratio: general rows are whole rows, and the nearest "
            f"whole-row total to the budget is {general_tokens} tokens")


def describe_mix(manifest: dict) -> str:
    """Return the mix in one line: rows and tokens of each source and the ratio reached, against the request."""
    def rows(n: int, kind: str) -> str:
        return f"{n} {kind} row{'' if n == 1 else 's'}"
    task = f"{rows(manifest['task_rows'], 'task')} ({manifest['task_tokens']:,} tokens)"
    general = f"{rows(manifest['general_rows'], 'general')} ({manifest['general_tokens']:,} tokens)"
    parts = {"sft": [task], "general": [general]}.get(manifest["mode"], [task, general])
    return " + ".join(parts) + f"; ratio {manifest['ratio']:.4g} ({manifest['ratio_note']})"


def write_mix(mix: Mix, out_dir: str | Path) -> None:
    """Write mix.jsonl (one chat row per line, with its source) and manifest.json into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "mix.jsonl", "w", encoding="utf-8") as f:
        f.writelines(mix_lines(mix))
    (out_dir / "manifest.json").write_text(json.dumps(mix.manifest, indent=1) + "\n", encoding="utf-8")


def mix_lines(mix: Mix):
    """Yield the lines of mix.jsonl: one chat row per line with its id, source and token count."""
    for row in mix.rows:
        e = row.example
        record = {"id": e.id, "source": e.source, "tokens": row.tokens, "truncated": row.truncated,
                  "messages": list(e.messages)}
        yield json.dumps(record, ensure_ascii=False) + "\n"


def read_mix(out_dir: str | Path) -> Mix:
    """Return the Mix written by write_mix (used to resume training exactly as it started)."""
    out_dir = Path(out_dir)
    rows = []
    with open(out_dir / "mix.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            example = Example(r["id"], tuple(r["messages"]), r["source"])
            rows.append(MixRow(example, r["tokens"], r["truncated"]))
    return Mix(tuple(rows), json.loads((out_dir / "manifest.json").read_text(encoding="utf-8")))
