"""Stage — select: choose the few rows worth training on from a larger pool (LTD, arXiv 2305.09246).

In: pool rows (a file, a built-in general set or a built-in task's training pool), a method (kcenter,
kmeans, random), k rows or a token budget, a model. Out: a ``Selection`` — the chosen rows in pool order,
exactly as the pool held them, and its record (chosen indices, cluster sizes, coverage radius, embedding
facts). Each row is embedded with the model's own hidden states: the last hidden state mean-pooled over the
rendered prompt tokens and L2-normalised (the LTD recipe). Embeddings and selections are cached under
``$TELL_CACHE``. The data then flows on as task rows: select → anchor → mix.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tell.config import ModelConfig, SelectConfig
from tell.data import BUILTIN_GENERAL, Example, FieldMap, TellInputError, read_raw_records, record_to_messages, \
    with_empty_answer

METHODS = ("kcenter", "kmeans", "random")
# Bump when the embedding code changes what it computes: cached vectors of older code are then not reused.
EMBEDDING_VERSION = 1
SELECTION_VERSION = 1
POOLING = "mean of the last hidden state (after the final norm) over the rendered prompt tokens, L2-normalised"
# A shared token prefix shorter than this is not worth a separate forward pass.
MIN_PREFIX_TOKENS = 16
KMEANS_INITS = 10
TSNE_MAX_POINTS = 5000  # t-SNE of 3,000 pool rows takes ~1 min on 2 cores; larger pools get a PCA map


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


# --- embeddings --------------------------------------------------------------------------------------------

def _common_prefix(encoded: list[list[int]]) -> int:
    """Return the length of the token prefix all rows share, leaving every row at least one token of its own."""
    first, length = encoded[0], min(len(e) for e in encoded) - 1
    for e in encoded[1:]:
        length = min(length, next((i for i, (a, b) in enumerate(zip(first, e)) if a != b), length))
    return max(length, 0)


def _states(body, ids: torch.Tensor, positions: torch.Tensor, cache, layer: int, layers: int, keep: bool = False):
    """Return (hidden states of `layer`, the KV cache when `keep`) of one forward pass of the transformer body,
    reading the KV cache of earlier tokens when one is given."""
    import inspect
    # transformers 5.24 renamed past_key_values to cache (the old name warns); older 5.x know only the old one
    name = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    out = body(input_ids=ids, position_ids=positions, use_cache=keep or cache is not None,
               output_hidden_states=layer < layers, **{name: cache})
    states = out.last_hidden_state if layer >= layers else out.hidden_states[layer]
    return states.float(), getattr(out, name, None)


@torch.inference_mode()
def hidden_states(model, tokenizer, texts: list[str], layer: int = -1, pool: str = "mean", batch_size: int = 16,
                  progress: bool = False) -> np.ndarray:
    """Return one vector per text: the hidden state of `layer` (0 = embeddings; -1 or the layer count = the
    last, after the final norm) at the last token ('last') or averaged over all tokens ('mean').

    Rows are batched by length and right-padded (causal attention keeps padding out of every real token's
    state). The token prefix all texts share (a task's instructions: ~300 of a Halu prompt's ~500 tokens)
    is computed once and its KV cache reused; its states count into each mean: (prefix sum + row sum) / length.
    """
    from tqdm.auto import tqdm
    from tell.generate import length_batches
    body = model.base_model  # the transformer without the LM head, whose logits would cost ~20% more
    layers = int(model.config.num_hidden_layers)
    layer = layers if layer < 0 else layer
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prefix = _common_prefix(encoded) if len(encoded) > 1 else 0
    prefix = prefix if prefix >= MIN_PREFIX_TOKENS else 0
    cache, prefix_sum = None, 0.0
    if prefix:
        states, cache = _states(body, torch.tensor([encoded[0][:prefix]], device=device),
                                torch.arange(prefix, device=device)[None], None, layer, layers, keep=True)
        prefix_sum = states[0].sum(0)
    vectors = torch.empty((len(texts), int(model.config.hidden_size)))
    bar = tqdm(total=len(texts), desc="embed", unit="row", disable=not progress, dynamic_ncols=True)
    for batch in length_batches([len(e) - prefix for e in encoded], batch_size):
        rest = [encoded[i][prefix:] for i in batch]
        lengths = torch.tensor([len(r) for r in rest], device=device)
        ids = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
        for row, tokens in enumerate(rest):
            ids[row, :len(tokens)] = torch.tensor(tokens)
        batch_cache = None
        if cache is not None:
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(batch))
        positions = prefix + torch.arange(ids.shape[1], device=device)[None].expand(len(batch), -1)
        states, _ = _states(body, ids.to(device), positions, batch_cache, layer, layers)
        if pool == "last":
            chosen = states[torch.arange(len(batch), device=device), lengths - 1]
        else:
            real = (torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]).float()[..., None]
            chosen = (prefix_sum + (states * real).sum(1)) / (prefix + lengths)[:, None].float()
        vectors[batch] = chosen.cpu()
        bar.update(len(batch))
    bar.close()
    return vectors.numpy()


def _sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_identity(name: str) -> str:
    """Return what names the model's weights: its directory with the sizes and times of its files, or its id."""
    from tell.model import resolve_model_path
    path = resolve_model_path(name)
    if isinstance(path, str):
        return path
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    return f"{path}:" + hashlib.sha256(json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                   for p in files]).encode()).hexdigest()[:16]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    """Write a cache entry through `<path>.partial`, renamed when complete (a kill never leaves half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    write(partial)
    partial.replace(path)


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would append .npy to the .partial name
        np.save(f, array)


def pool_embeddings(texts: list[str], key: str, model: ModelConfig, batch_size: int) -> tuple[np.ndarray, dict]:
    """Return the L2-normalised embeddings of the prompt texts and facts about them (cache hit or miss,
    seconds, shared prefix), computing them unless $TELL_CACHE/embeddings holds them under `key`."""
    from tell.generate import load_for_generation
    from tell.model import cache_dir
    path = cache_dir() / "embeddings" / f"{key}.npy"
    if path.is_file():
        vectors = np.load(path)
        if vectors.shape[0] == len(texts):
            return vectors, {"embedding_cache": "hit"}
    run = load_for_generation(None, model)
    start = time.perf_counter()
    raw = hidden_states(run.model, run.tokenizer, texts, -1, "mean", batch_size, progress=True)
    vectors = (raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    seconds = time.perf_counter() - start
    _atomic_write(path, lambda p: _save_array(p, vectors))
    return vectors, {"embedding_cache": "miss", "embedding_s": round(seconds, 1),
                     "embedding_rows_per_s": round(len(texts) / seconds, 2) if seconds else None,
                     "dtype": str(next(run.model.parameters()).dtype).replace("torch.", "")}


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
    embedding = {"version": EMBEDDING_VERSION, "model": _model_identity(model.name), "dtype": model.dtype,
                 "device": model.device, "pooling": POOLING, "files": [_sha256_file(f) for f in files],
                 "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest()}
    embedding_key = _key(embedding)
    vectors, facts = pool_embeddings(texts, embedding_key, model, cfg.batch_size)
    choice_key = _key(SELECTION_VERSION, embedding_key, method, cfg.seed, k, tokens, row_tokens if tokens else None)
    cached = cache_dir() / "selections" / f"{choice_key}.json"
    if cached.is_file():
        indices = json.loads(cached.read_text(encoding="utf-8"))["chosen_indices"]
    else:
        indices = choose(vectors, method, cfg.seed, k, tokens, row_tokens)
        _atomic_write(cached, lambda p: p.write_text(json.dumps({"chosen_indices": indices}), encoding="utf-8"))
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


def plot_map(groups: dict[str, np.ndarray], title: str, png: Path, seed: int, emphasise: tuple[str, ...] = ()) -> str:
    """Write one 2-D map of all groups (fitted together, so positions are comparable) and return how it was
    made: t-SNE, or PCA for more than TSNE_MAX_POINTS points (or fewer than 4). Emphasised groups are drawn
    last, as large stars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    vectors = np.concatenate(list(groups.values()))
    if 4 <= len(vectors) <= TSNE_MAX_POINTS:
        from sklearn.manifold import TSNE
        perplexity = float(max(2.0, min(30.0, (len(vectors) - 1) / 3)))
        points, how = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(
            vectors), "t-SNE"
    else:
        from sklearn.decomposition import PCA
        points = PCA(n_components=min(2, *vectors.shape), random_state=seed).fit_transform(vectors)
        points, how = np.pad(points, ((0, 0), (0, 2 - points.shape[1]))), "PCA"
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    start = 0
    for (label, group), marker in zip(groups.items(), ("o", "^", "s", "D")):
        style = {"s": 90, "marker": "*", "edgecolors": "black", "linewidths": 0.6, "zorder": 3} \
            if label in emphasise else {"s": 14, "marker": marker, "alpha": 0.7}
        ax.scatter(*points[start:start + len(group)].T, label=label, **style)
        start += len(group)
    ax.set_title(f"{how} of {title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120, format="png")  # the name may end in .partial
    plt.close(fig)
    return how


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
