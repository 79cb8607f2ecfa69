"""Stage — embed: the model's own hidden states of texts, cached, and a 2-D map of them (for select and probe).

In: texts (rendered prompts), a model. Out: one vector per text — a layer's hidden state at the last token or
averaged over the tokens — computed in length-grouped batches with the token prefix all texts share computed
once; `pool_embeddings` L2-normalises them and caches them under ``$TELL_CACHE/embeddings`` by a content key;
`plot_map` draws groups of vectors as one t-SNE (or PCA) map.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from tell.config import ModelConfig

# Bump when the embedding code changes what it computes: cached vectors of older code are then not reused.
EMBEDDING_VERSION = 1
# A shared token prefix shorter than this is not worth a separate forward pass.
MIN_PREFIX_TOKENS = 16
TSNE_MAX_POINTS = 5000  # t-SNE of 3,000 pool rows takes ~1 min on 2 cores; larger pools get a PCA map


def _states(body, ids: torch.Tensor, positions: torch.Tensor, cache, layer: int, layers: int, keep: bool = False):
    """Return (hidden states of `layer`, the KV cache when `keep`) of one forward pass of the transformer body,
    reading the KV cache of earlier tokens when one is given."""
    out = body(input_ids=ids, position_ids=positions, use_cache=keep or cache is not None,
               output_hidden_states=layer < layers, cache=cache)
    states = out.last_hidden_state if layer >= layers else out.hidden_states[layer]
    return states.float(), out.cache


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
    from tell.generate import common_prefix_length, length_batches
    body = model.base_model  # the transformer without the LM head, whose logits would cost ~20% more
    layers = int(model.config.num_hidden_layers)
    layer = layers if layer < 0 else layer
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prefix = common_prefix_length(encoded) if len(encoded) > 1 else 0
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


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_identity(name: str) -> str:
    """Return what names the model's weights: its directory with the sizes and times of its files, or its id."""
    from tell.model import resolve_model_path
    path = resolve_model_path(name)
    if isinstance(path, str):
        return path
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    return f"{path}:" + hashlib.sha256(json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                   for p in files]).encode()).hexdigest()[:16]


def content_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write(path: Path, write) -> None:
    """Write a cache entry through `<path>.partial`, renamed when complete (a kill never leaves half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    write(partial)
    partial.replace(path)


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would append .npy to the .partial name
        np.save(f, array)


def pool_embeddings(texts: list[str], key: str, model: ModelConfig, batch_size: int) -> tuple[np.ndarray, dict]:
    """Return the L2-normalised embeddings of the prompt texts and facts about them (cache hit or miss; on a
    miss the seconds, rows per second, dtype and machine), computed unless $TELL_CACHE/embeddings holds `key`."""
    from tell.generate import load_for_generation
    from tell.hardware import dtype_name, machine
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
    atomic_write(path, lambda p: _save_array(p, vectors))
    return vectors, {"embedding_cache": "miss", "embedding_s": round(seconds, 1),
                     "embedding_rows_per_s": round(len(texts) / seconds, 2) if seconds else None,
                     "dtype": dtype_name(next(run.model.parameters()).dtype),
                     "machine": machine(next(run.model.parameters()).device)}


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
