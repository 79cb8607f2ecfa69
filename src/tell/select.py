"""Stage — select: choose the few rows worth training on from a larger pool (LTD, arXiv 2305.09246).

In: pool rows (a file, a built-in general set or a built-in task's training pool), a method (kcenter,
kmeans, random), k rows or a token budget, a model. Out: a ``Selection`` — the chosen rows in pool order,
exactly as the pool held them, and its record (chosen indices, cluster sizes, coverage radius, embedding
facts). Each row is embedded with the model's own hidden states (embed.py): the last hidden state mean-pooled
over the rendered prompt tokens and L2-normalised (the LTD recipe). Embeddings and selections are cached
under ``$TELL_CACHE``. The data then flows on as task rows: select → anchor → mix.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tell.config import ModelConfig, SelectConfig
from tell.data import BUILTIN_GENERAL, Example, FieldMap, TellInputError, read_raw_records, record_to_messages, \
    with_empty_answer
from tell.embed import (EMBEDDING_VERSION, atomic_write, content_key, model_identity, plot_map, pool_embeddings,
                        sha256_file)

METHODS = ("kcenter", "kmeans", "random")
SELECTION_VERSION = 1
POOLING = "mean of the last hidden state (after the final norm) over the rendered prompt tokens, L2-normalised"
KMEANS_INITS = 10


@dataclass(frozen=True)
class PoolRow:
    """One candidate row: its chat example and its JSON text as the pool holds it (what gets written)."""

    example: Example
    raw: str


@dataclass(frozen=True, eq=False)
class Selection:
    """The chosen rows (pool order), their pool indices, the record written as selection.json, and the
    embeddings of the whole pool (for the map)."""

    rows: tuple[PoolRow, ...]
    indices: tuple[int, ...]
    record: dict
    vectors: np.ndarray = field(repr=False)


# --- the pool ----------------------------------------------------------------------------------------------

def read_pool(spec: str, fields: FieldMap = FieldMap(), answers_required: bool = True) -> list[PoolRow]:
    """Return the rows of a pool: a .json/.jsonl file, a built-in general set ('alpaca', 'alpaca+dpo'; rows as
    the shipped files hold them) or a built-in task's training pool ('halu-cot-json', ...; rows in chat form
    with their id). Without `answers_required`, prompt-only rows (nothing labelled yet) are read too."""
    from tell.tasks import ALIASES, TASKS, get_task
    if not str(spec).strip():
        raise TellInputError("no pool: pass --pool FILE (or a built-in name)", None, None, "data.select_pool")
    if ALIASES.get(spec, spec) in TASKS:
        return pool_from_examples(get_task(spec).train_examples(None, 0))
    rows = []
    for path in BUILTIN_GENERAL.get(spec, (Path(spec),)):
        for line, rec, raw in read_raw_records(path):
            rec = rec if answers_required else with_empty_answer(rec, fields)
            # ids as load_examples gives task rows, so a selected row keeps the id it has unselected
            rows.append(PoolRow(Example(f"task:{Path(path).name}:{line}", record_to_messages(rec, fields, path, line),
                                        "task", str(path), line), raw))
    return rows


def pool_from_examples(examples: list[Example]) -> list[PoolRow]:
    """Return chat examples as pool rows whose text is the chat row with its id (`tell train --task` reads it)."""
    return [PoolRow(e, json.dumps({"messages": list(e.messages), "id": e.id}, ensure_ascii=False)) for e in examples]


def check_request(pool: list[PoolRow], method: str, k: int, tokens: int, where: str) -> None:
    """Raise on a request no pool row count can meet (checked before any model or tokenizer loads)."""
    if method not in METHODS:
        raise TellInputError(f"unknown selection method {method!r}; choose from {list(METHODS)}", None, None,
                             "data.select")
    if not pool:
        raise TellInputError("the pool has no rows", where or None)
    if k and tokens:
        raise TellInputError("give either k rows or a token budget, not both", where or None, None, "select.tokens")
    if k < 0 or tokens < 0 or not (k or tokens):
        raise TellInputError(f"the number of rows to choose must be >= 1 (got k={k}) unless a token budget is "
                             "given (--tokens T)", where or None, None, "select.k")
    if k > len(pool):
        raise TellInputError(f"asked for {k} rows, but the pool has only {len(pool)}", where or None, None,
                             "select.k")


# --- choosing ----------------------------------------------------------------------------------------------

def _distances_to(vectors: np.ndarray, row: int) -> np.ndarray:
    return np.linalg.norm(vectors - vectors[row], axis=1)


def kcenter_order(vectors: np.ndarray, seed: int, fits=lambda i: True, count: int | None = None) -> list[int]:
    """Return rows in greedy farthest-point order (k-center): a seeded first row, then each time the row
    farthest from all chosen ones (ties: the lowest index). Rows `fits` rejects are passed over."""
    n = len(vectors)
    nearest = np.full(n, np.inf)
    order, first = [], random.Random(seed).randrange(n)
    candidate = first
    while candidate is not None and len(order) < (count or n):
        if fits(candidate):
            order.append(candidate)
            nearest = np.minimum(nearest, _distances_to(vectors, candidate))
        nearest[candidate] = -1.0  # never again: chosen, or too long for what is left of the budget
        nearest[order] = -1.0
        best = int(np.argmax(nearest))
        candidate = best if nearest[best] >= 0 else None
    return order


def kmeans_rows(vectors: np.ndarray, clusters: int, seed: int) -> list[int]:
    """Return the pool row nearest each k-means centroid (scikit-learn, seeded, fixed restarts), largest
    cluster first; a row nearest two centroids is taken once, the second centroid taking its next nearest."""
    from sklearn.cluster import KMeans
    fit = KMeans(n_clusters=clusters, n_init=KMEANS_INITS, random_state=seed).fit(vectors)
    sizes = np.bincount(fit.labels_, minlength=clusters)
    chosen: list[int] = []
    for c in sorted(range(clusters), key=lambda c: (-sizes[c], c)):
        distance = np.linalg.norm(vectors - fit.cluster_centers_[c], axis=1)
        chosen.append(next(int(i) for i in np.argsort(distance, kind="stable") if int(i) not in chosen))
    return chosen


def random_order(rows: int, seed: int) -> list[int]:
    """Return the seeded permutation that tasks.seeded_sample cuts (so `random` k rows = its k-row draw)."""
    return random.Random(seed).sample(range(rows), rows)


def choose(vectors: np.ndarray, method: str, seed: int, k: int = 0, budget: int = 0,
           row_tokens: list[int] | None = None) -> list[int]:
    """Return the chosen pool indices, sorted: k rows, or rows up to `budget` tokens taken in the method's
    order (k-center's farthest-point order; random's seeded order; for kmeans the representatives of
    budget / mean row tokens clusters, largest cluster first), a row that would overshoot passed over."""
    if k:
        picked = {"kcenter": lambda: kcenter_order(vectors, seed, count=k),
                  "kmeans": lambda: kmeans_rows(vectors, k, seed),
                  "random": lambda: random_order(len(vectors), seed)[:k]}[method]()
        return sorted(picked)
    left = [budget]

    def fits(i: int) -> bool:
        if row_tokens[i] > left[0]:
            return False
        left[0] -= row_tokens[i]
        return True

    if method == "kcenter":
        return sorted(kcenter_order(vectors, seed, fits))
    if method == "kmeans":
        clusters = min(len(vectors), max(1, int(budget // float(np.mean(row_tokens)))))
        order = kmeans_rows(vectors, clusters, seed)
    else:
        order = random_order(len(vectors), seed)
    return sorted(i for i in order if fits(i))


def coverage(vectors: np.ndarray, chosen: list[int]) -> dict:
    """Return the coverage radius (largest distance of a pool row to its nearest chosen row), the mean of
    those distances, and cluster sizes: how many pool rows are nearest each chosen row (in `chosen` order)."""
    nearest = np.full(len(vectors), np.inf)
    owner = np.zeros(len(vectors), dtype=int)
    for j, row in enumerate(chosen):
        distance = _distances_to(vectors, row)
        closer = distance < nearest
        nearest[closer], owner[closer] = distance[closer], j
    return {"coverage_radius": float(nearest.max()), "mean_distance": float(nearest.mean()),
            "cluster_sizes": np.bincount(owner, minlength=len(chosen)).tolist()}


# --- the stage ---------------------------------------------------------------------------------------------

def _check_lengths(pool: list[PoolRow], encoded_lengths: list[int], context: int) -> None:
    for row, length in zip(pool, encoded_lengths):
        if length > context:
            raise TellInputError(f"the row's prompt has {length} tokens, more than the model's context of "
                                 f"{context}; shorten or drop it", row.example.file or None, row.example.line,
                                 "prompt")


def choose_rows(pool: list[PoolRow], method: str, k: int, tokens: int, cfg: SelectConfig, model: ModelConfig,
                count_tokenizer: str = "", where: str = "") -> Selection:
    """Return the selection of k rows (or rows up to `tokens` tokens) from the pool by `method`.

    Bad requests and rows longer than the model's context stop it before the model loads. The embeddings
    ($TELL_CACHE/embeddings) and the choice ($TELL_CACHE/selections) are cached by the content of what is
    embedded (the rendered prompts, the pool files' hashes), the model, the pooling and the code version.
    """
    from transformers import AutoConfig
    from tell.mix import encode_examples, render_prompt
    from tell.model import cache_dir, context_length, load_tokenizer, resolve_model_path
    check_request(pool, method, k, tokens, where)
    tokenizer = load_tokenizer(model.name)
    texts = [render_prompt(tokenizer, row.example.prompt_messages) for row in pool]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    _check_lengths(pool, lengths, context_length(AutoConfig.from_pretrained(resolve_model_path(model.name))))
    counter = load_tokenizer(count_tokenizer) if count_tokenizer else tokenizer
    row_tokens = [len(e.input_ids) for e in encode_examples(counter, [row.example for row in pool])]
    if tokens and tokens < min(row_tokens):
        raise TellInputError(f"no row fits a budget of {tokens} tokens (the shortest has {min(row_tokens)})",
                             where or None, None, "select.tokens")
    if tokens and tokens >= sum(row_tokens):
        raise TellInputError(f"the budget of {tokens} tokens holds the whole pool ({sum(row_tokens)} tokens in "
                             f"{len(pool)} rows): nothing to choose", where or None, None, "select.tokens")
    files = sorted({row.example.file for row in pool if row.example.file and Path(row.example.file).is_file()})
    embedding = {"version": EMBEDDING_VERSION, "model": model_identity(model.name), "dtype": model.dtype,
                 "device": model.device, "pooling": POOLING, "files": [sha256_file(f) for f in files],
                 "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest()}
    embedding_key = content_key(embedding)
    vectors, facts = pool_embeddings(texts, embedding_key, model, cfg.batch_size)
    choice_key = content_key(SELECTION_VERSION, embedding_key, method, cfg.seed, k, tokens, row_tokens if tokens else None)
    cached = cache_dir() / "selections" / f"{choice_key}.json"
    if cached.is_file():
        indices = json.loads(cached.read_text(encoding="utf-8"))["chosen_indices"]
    else:
        indices = choose(vectors, method, cfg.seed, k, tokens, row_tokens)
        atomic_write(cached, lambda p: p.write_text(json.dumps({"chosen_indices": indices}), encoding="utf-8"))
    record = {"method": method, "seed": cfg.seed, "k": len(indices), "tokens_budget": tokens,
              "chosen_tokens": sum(row_tokens[i] for i in indices), "pool_rows": len(pool),
              "pool_tokens": sum(row_tokens), "chosen_indices": indices,
              "chosen_lines": [pool[i].example.line for i in indices], "chosen_ids": [pool[i].example.id for i in indices],
              **coverage(vectors, indices), "distance": "euclidean between the L2-normalised embeddings",
              "model": model.name, "pooling": POOLING, "pool_files": dict(zip(files, embedding["files"])),
              "embedding_cache_key": embedding_key, "selection_cache_key": choice_key, **facts}
    return Selection(tuple(pool[i] for i in indices), tuple(indices), record, vectors)


# --- outputs -----------------------------------------------------------------------------------------------

def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """Return the selected-rows file and, beside it, selection.json and selection.png."""
    out = Path(out)
    return out, out.parent / "selection.json", out.parent / "selection.png"


def check_outputs(out: str | Path, overwrite: bool) -> None:
    """Raise when --out is missing or any output exists (unless overwrite), before any expensive work."""
    if not str(out).strip():
        raise TellInputError("no output file: pass --out selected.jsonl", None, None, "out")
    if Path(out).is_dir():
        raise TellInputError("is a directory; --out names the JSONL file of the chosen rows", out)
    existing = [p for p in output_paths(out) if p.exists()]
    if existing and not overwrite:
        raise TellInputError("already exists (pass --overwrite to replace it)", existing[0])


def write_selection(selection: Selection, out: str | Path, config: dict | None = None) -> dict:
    """Write the chosen rows (their pool text, pool order), selection.json and selection.png; each through
    `<name>.partial`, renamed when all three are complete. Return the record as written."""
    rows_path, record_path, png_path = output_paths(out)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    partials = [p.with_name(p.name + ".partial") for p in (rows_path, png_path, record_path)]
    try:
        partials[0].write_text("".join(row.raw + "\n" for row in selection.rows), encoding="utf-8")
        chosen = np.zeros(len(selection.vectors), dtype=bool)
        chosen[list(selection.indices)] = True
        record = selection.record
        title = (f"{record['pool_rows']} pool rows, {record['k']} chosen by {record['method']} (seed "
                 f"{record['seed']})\ncoverage radius {record['coverage_radius']:.3f}")
        how = plot_map({"pool": selection.vectors[~chosen], "chosen": selection.vectors[chosen]}, title,
                       partials[1], record["seed"], emphasise=("chosen",))
        record = {**record, "map": how, **({"config": config} if config else {})}
        partials[2].write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    except BaseException:
        for p in partials:
            p.unlink(missing_ok=True)
        raise
    for partial, final in zip(partials, (rows_path, png_path, record_path)):
        partial.replace(final)
    return record
