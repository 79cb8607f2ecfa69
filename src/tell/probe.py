"""Experiment: `tell probe` — does the anchor set task queries apart from general ones? (paper Fig. 3/4)

In: a model or a trained run (base + adapter + its anchor), a task, general rows and a ProbeConfig. Out, in
``out``: ``probe.png`` (one t-SNE map of task queries without and with the anchor and of general queries)
and ``probe.json``: at the chosen layer (default: the middle one) the silhouette score of task vs general
queries and the distance between their centroids relative to their spread, without and with the anchor.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tell.compare import default_anchor
from tell.config import RunConfig, config_dict
from tell.data import TellInputError, load_examples
from tell.experiment import (announce, field_map, resolve_self_instruct, staged_output, task_from_config)


@torch.inference_mode()
def hidden_states(model, tokenizer, texts: list[str], layer: int, pool: str, batch_size: int = 8) -> np.ndarray:
    """Return one vector per text: the layer's hidden state at the last token, or the mean over tokens."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vectors = []
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[start:start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):  # left padding: the last position is every row's last real token
            ids[row, width - len(e):], mask[row, width - len(e):] = torch.tensor(e), 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding must not shift the real tokens' positions
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[layer].float()
        if pool == "last":
            vectors.append(hidden[:, -1])
        else:
            weights = mask.to(device)[..., None].float()
            vectors.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(vectors).cpu().numpy()


def separation(task: np.ndarray, general: np.ndarray) -> dict:
    """Return the silhouette score of task vs general vectors and their centroid distance over the spread.

    Spread: the root-mean-square distance of the vectors to their own group's centroid, pooled over both.
    """
    from sklearn.metrics import silhouette_score
    vectors = np.concatenate([task, general])
    labels = np.array([0] * len(task) + [1] * len(general))
    centroids = task.mean(0), general.mean(0)
    distance = float(np.linalg.norm(centroids[0] - centroids[1]))
    squared = np.concatenate([((task - centroids[0]) ** 2).sum(1), ((general - centroids[1]) ** 2).sum(1)])
    spread = float(np.sqrt(squared.mean()))
    return {"silhouette": float(silhouette_score(vectors, labels)), "centroid_distance": distance,
            "spread": spread, "distance_over_spread": distance / spread if spread else float("inf")}


def plot_tsne(groups: dict[str, np.ndarray], numbers: dict, png: Path, seed: int) -> None:
    """Write one t-SNE map of all groups (fitted together, so positions are comparable)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    vectors = np.concatenate(list(groups.values()))
    perplexity = float(max(2.0, min(30.0, (len(vectors) - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(vectors)
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    start = 0
    for (label, group), marker in zip(groups.items(), ("o", "^", "s")):
        ax.scatter(*points[start:start + len(group)].T, s=14, marker=marker, alpha=0.7, label=label)
        start += len(group)
    ax.set_title("t-SNE of layer {layer} hidden states\nsilhouette task vs general: {without:.3f} without the "
                 "anchor, {with_:.3f} with it".format(layer=numbers["layer"], without=numbers["without_anchor"]
                                                      ["silhouette"], with_=numbers["with_anchor"]["silhouette"]),
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _layer(model, wanted: int) -> int:
    layers = int(model.config.num_hidden_layers)
    if wanted > layers:
        raise TellInputError(f"the model has {layers} layers; choose 0..{layers} (-1 = the middle one)",
                             None, None, "probe.layer")
    return layers // 2 if wanted < 0 else wanted


def _general_prompts(cfg: RunConfig, count: int) -> list[tuple[dict, ...]]:
    from tell.tasks import seeded_sample
    examples = load_examples(cfg.data.general, "general", field_map(cfg))
    return [e.prompt_messages for e in seeded_sample(examples, count, cfg.probe.seed)]


def run_probe(cfg: RunConfig, run_dir: str | None = None, overwrite: bool = False) -> dict:
    """Probe the hidden states of task queries (without, with the anchor) and general queries; write
    probe.json and probe.png into cfg.out and return the numbers."""
    from tell.generate import load_for_generation, prompt_texts
    from tell.mix import render_prompt
    announce(cfg)
    task = task_from_config(cfg)
    rows = task.test_rows(cfg.probe.rows, cfg.probe.seed)
    general = _general_prompts(cfg, len(rows))
    run = load_for_generation(run_dir, cfg.model)
    if not run_dir:  # a plain model: the anchor comes from the flags, or the task's default one
        default_anchor(cfg, task)
        if cfg.anchor.mode == "self-instruct":
            resolve_self_instruct(cfg, task.train_examples(cfg.anchor.self_instruct_rows, cfg.mix.seed))
        from tell.anchor import resolve_anchor_text
        run = replace(run, anchor=resolve_anchor_text(cfg.anchor), placement=cfg.anchor.placement)
    if not run.anchor:
        raise TellInputError("the probe compares queries with and without an anchor, and this one is empty",
                             None, None, "anchor.text")
    layer = _layer(run.model, cfg.probe.layer)
    texts = {"task, no anchor": prompt_texts(run, [r.messages for r in rows], use_anchor=False),
             "task, with anchor": prompt_texts(run, [r.messages for r in rows], use_anchor=True),
             "general": [render_prompt(run.tokenizer, m) for m in general]}
    groups = {k: hidden_states(run.model, run.tokenizer, v, layer, cfg.probe.pool) for k, v in texts.items()}
    numbers = {"layer": layer, "layers": int(run.model.config.num_hidden_layers), "pool": cfg.probe.pool,
               "task_rows": len(rows), "general_rows": len(general), "anchor": run.anchor,
               "placement": run.placement, "run": run_dir or "", "model": cfg.model.name,
               "without_anchor": separation(groups["task, no anchor"], groups["general"]),
               "with_anchor": separation(groups["task, with anchor"], groups["general"])}
    out = cfg.out or "runs/probe"
    with staged_output(out, overwrite) as tmp:
        plot_tsne(groups, numbers, tmp / "probe.png", cfg.probe.seed)
        (tmp / "probe.json").write_text(json.dumps({**numbers, "config": config_dict(cfg)}, indent=1) + "\n",
                                        encoding="utf-8")
    return numbers
