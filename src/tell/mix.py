"""Stage 3 — mix: the token-budgeted extensive shuffle.

In: anchored task examples, the general pool, a MixConfig and a tokenizer. Out: a ``Mix`` — the
ordered rows with their token counts — and its manifest. The general:task ratio is counted in tokens
of the fully rendered rows (chat template applied, prompt + answer). General rows are drawn seeded
without replacement until the ratio is reached, then all rows are ordered (default: uniform shuffle).
"""
from __future__ import annotations

import json
import math
import random
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
    """Token ids of a rendered row and how many of them are prompt (not trained)."""

    input_ids: tuple[int, ...]
    prompt_tokens: int


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


def encode_examples(tokenizer, examples: list[Example]) -> list[Encoded]:
    """Return token ids of each fully rendered example and its prompt length (labels start there)."""
    prompts = [render_prompt(tokenizer, e.prompt_messages) for e in examples]
    fulls = [_render_full(tokenizer, e.messages) for e in examples]
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"] if fulls else []
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    encoded = []
    for e, ids, pids, full, prompt in zip(examples, full_ids, prompt_ids, fulls, prompts):
        if not full.startswith(prompt) or list(ids[: len(pids)]) != list(pids):
            # The template merged prompt and answer tokens; fall back to a character split.
            pids = tokenizer(full[: len(prompt)], add_special_tokens=False)["input_ids"]
        encoded.append(Encoded(tuple(ids), min(len(pids), len(ids))))
    return encoded


def _check_lengths(examples, encoded, max_length, on_long) -> tuple[list, list, int, int]:
    """Return (kept examples, kept encodings, skipped count, truncated count) under on_long."""
    kept, kept_enc, skipped, truncated = [], [], 0, 0
    for example, enc in zip(examples, encoded):
        if len(enc.input_ids) > max_length:
            if on_long == "error":
                raise TellInputError(
                    f"row has {len(enc.input_ids)} tokens, more than max_length {max_length}; "
                    "use --on-long skip|truncate or a larger --max-length", example.file, example.line)
            if on_long == "skip":
                skipped += 1
                continue
            truncated += 1
        kept.append(example)
        kept_enc.append(enc)
    return kept, kept_enc, skipped, truncated


def parse_ratio(ratio: str) -> float | None:
    """Return the ratio as a float, or None for 'max' (the whole pool)."""
    if str(ratio) == "max":
        return None
    value = float(ratio)
    if not 0 <= value < math.inf:  # inf would draw forever with allow_repeat; nan would draw nothing
        raise TellInputError(f"ratio must be a finite number >= 0, got {ratio}", None, None, "mix.ratio")
    return value


def draw_general(pool_tokens: list[int], target_tokens: float | None, seed: int,
                 allow_repeat: bool) -> tuple[list[int], int]:
    """Return (indices into the pool, number of repeated draws) summing to ≈ target tokens."""
    rng = random.Random(f"{seed}-draw")
    if target_tokens is None:
        order = list(range(len(pool_tokens)))
        rng.shuffle(order)
        return order, 0
    chosen, total, repeats, used = [], 0, 0, set()
    while total < target_tokens:
        order = [i for i in range(len(pool_tokens))]
        rng.shuffle(order)
        for i in order:
            if total + pool_tokens[i] / 2 >= target_tokens:
                break  # adding this row would overshoot by more than it fills
            if i in used:
                repeats += 1
            chosen.append(i)
            used.add(i)
            total += pool_tokens[i]
        else:
            if not allow_repeat and total < target_tokens:  # the pool's last row may have crossed the target
                raise TellInputError(
                    f"the general pool has {len(pool_tokens)} rows / {sum(pool_tokens)} tokens, fewer than "
                    f"the {int(target_tokens)} tokens the ratio asks for; lower --ratio, use --ratio max, "
                    "give a larger --general set, or pass --allow-repeat", None, None, "mix.ratio")
            continue
        break
    chosen += _best_fill(pool_tokens, used, target_tokens - total)
    return chosen, repeats


def _best_fill(pool_tokens: list[int], used: set, gap: float) -> list[int]:
    """Return [the unused row that best closes the remaining gap], if it brings us closer."""
    candidates = [i for i in range(len(pool_tokens)) if i not in used]
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


def build_mix(task: list[Example], general: list[Example], cfg: MixConfig, tokenizer,
              max_length: int, tokenizer_name: str = "") -> Mix:
    """Return the ordered mix of task rows and a token-ratio draw of general rows, with its manifest."""
    ratio = parse_ratio(cfg.ratio)
    if not task:
        raise TellInputError("the task set is empty", None, None, "data.task")
    task, task_enc, task_skipped, task_trunc = _check_lengths(
        task, encode_examples(tokenizer, task), max_length, cfg.on_long)
    if not task:
        raise TellInputError(f"every task row is longer than max_length {max_length}", None, None, "data.task")
    task_rows = [MixRow(e, min(len(x.input_ids), max_length), len(x.input_ids) > max_length)
                 for e, x in zip(task, task_enc)]
    task_tokens = sum(r.tokens for r in task_rows)
    general_rows, gen_skipped, gen_trunc, repeats, pool_tokens = [], 0, 0, 0, 0
    if cfg.mode != "sft":
        if not general:
            raise TellInputError("the general pool is empty", None, None, "data.general")
        general, gen_enc, gen_skipped, gen_trunc = _check_lengths(
            general, encode_examples(tokenizer, general), max_length, cfg.on_long)
        lengths = [min(len(x.input_ids), max_length) for x in gen_enc]
        pool_tokens = sum(lengths)
        target = None if ratio is None else ratio * task_tokens
        indices, repeats = draw_general(lengths, target, cfg.seed, cfg.allow_repeat)
        general_rows = [MixRow(general[i], lengths[i], len(gen_enc[i].input_ids) > max_length) for i in indices]
    general_tokens = sum(r.tokens for r in general_rows)
    trained_task = [] if cfg.mode == "general" else task_rows
    rows = ordered_rows(trained_task, general_rows, cfg.order, cfg.seed)
    achieved = general_tokens / task_tokens
    manifest = {
        "mode": cfg.mode, "order": cfg.order, "seed": cfg.seed,
        "tokenizer": tokenizer_name or getattr(tokenizer, "name_or_path", "?"),
        "task_rows": len(trained_task), "general_rows": len(general_rows),
        "task_tokens": sum(r.tokens for r in trained_task), "general_tokens": general_tokens,
        "budget_task_tokens": task_tokens,
        "ratio_requested": "max" if ratio is None else (0.0 if cfg.mode == "sft" else ratio),
        "ratio": round(achieved, 6),
        "ratio_note": _ratio_note(ratio, achieved, cfg.mode, pool_tokens, general_tokens),
        "general_pool_rows": len(general), "general_pool_tokens": pool_tokens, "general_repeats": repeats,
        "max_length": max_length, "on_long": cfg.on_long,
        "skipped_long": {"task": task_skipped, "general": gen_skipped},
        "truncated_long": {"task": task_trunc, "general": gen_trunc},
        "task_positions": [i for i, r in enumerate(rows) if r.example.source == "task"],
    }
    return Mix(tuple(rows), manifest)


def _ratio_note(ratio, achieved, mode, pool_tokens, general_tokens) -> str:
    if mode == "sft":
        return "mode sft: no general rows"
    if ratio is None:
        return f"ratio max: the whole pool ({pool_tokens} tokens)"
    if ratio == 0:
        return "ratio 0: no general rows"
    error = abs(achieved - ratio) / ratio
    if error <= 0.01:
        return f"within {error:.2%} of the requested ratio"
    return (f"{error:.1%} off the requested ratio: general rows are whole rows, and the nearest "
            f"whole-row total to the budget is {general_tokens} tokens")


def write_mix(mix: Mix, out_dir: str | Path) -> None:
    """Write mix.jsonl (one chat row per line, with its source) and manifest.json into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "mix.jsonl", "w", encoding="utf-8") as f:
        for row in mix.rows:
            e = row.example
            record = {"id": e.id, "source": e.source, "tokens": row.tokens, "truncated": row.truncated,
                      "messages": list(e.messages)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out_dir / "manifest.json").write_text(json.dumps(mix.manifest, indent=1) + "\n", encoding="utf-8")


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
