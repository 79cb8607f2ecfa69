"""Experiment: `tell probe` — does the anchor set task queries apart from general ones? (paper Fig. 3/4)

In: a model or a trained run (base + adapter + its anchor), a task, general rows and a ProbeConfig. Out, in
``out``: ``probe.png`` (one t-SNE map of task queries without and with the anchor and of general queries)
and ``probe.json``: at the chosen layer (default: the middle one) the silhouette score of task vs general
queries and the distance between their centroids relative to their spread, without and with the anchor.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from tell.compare import default_anchor
from tell.config import RunConfig, config_dict
from tell.data import TellInputError, load_examples
from tell.experiment import (announce, field_map, resolve_self_instruct, staged_output, task_from_config)
from tell.embed import hidden_states, plot_map


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


def probe_title(numbers: dict) -> str:
    """Return the map's title: the layer and the silhouettes without and with the anchor."""
    return ("layer {layer} hidden states\nsilhouette task vs general: {without:.3f} without the anchor, {with_:.3f} "
            "with it").format(layer=numbers["layer"], without=numbers["without_anchor"]["silhouette"],
                              with_=numbers["with_anchor"]["silhouette"])


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
        plot_map(groups, probe_title(numbers), tmp / "probe.png", cfg.probe.seed)
        (tmp / "probe.json").write_text(json.dumps({**numbers, "config": config_dict(cfg)}, indent=1) + "\n",
                                        encoding="utf-8")
    return numbers
