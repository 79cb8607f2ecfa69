"""Report-stage helper — the statistics of a sweep: curves with bootstrap intervals and the multiplier.

In: one flat record per finished sweep cell (as ``sweep.result_rows`` returns them). Out: curve points (the
mean over a point's seeds with a 95% interval from resampling test rows, paired across cells that share them,
and seeds) and the token-efficiency multiplier (the SFT task tokens that reach a TELL point's score, read off
SFT's curve on a log-token axis). Pure functions; sweep_report.py draws and writes them.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from tell.report import label_accuracy_of

SETTINGS = ("ratio", "anchor", "placement", "order", "lr", "select")
# The settings that can change each method's result (the sweep resets the others to defaults).
RELEVANT = {"base": (), "base-anchor": ("anchor", "placement", "select"), "sft": ("lr", "select"),
            "sft-matched": SETTINGS, "tell": SETTINGS, "general": SETTINGS}


@dataclass(frozen=True)
class Point:
    """One point of a curve: the mean over its seeds, with a 95% bootstrap interval."""

    curve: str
    x: float
    y: float
    low: float
    high: float
    cells: tuple


def cell_value(record: dict, metric: str) -> float:
    """Return a cell's score: the mean per-row task score ('score') or a key of its metrics.json."""
    if metric == "score":
        scores = record["row_scores"]
        return float(np.mean(scores)) if scores else 0.0
    return float(record["metrics"][metric])


def cells_below_majority(cells) -> bool:
    """Return True when the cells' mean label accuracy is under their mean majority baseline (all cells
    must have both; a label-free task never is)."""
    pairs = [(label_accuracy_of(r["metrics"]), r["metrics"].get("majority_baseline")) for r in cells]
    if not pairs or any(a is None or m is None for a, m in pairs):
        return False
    return float(np.mean([a for a, _ in pairs])) < float(np.mean([m for _, m in pairs]))


def resampled_means(groups: list[list[dict]], metric: str, resamples: int, seed: int = 0) -> np.ndarray:
    """Return (resamples × groups) bootstrap means: test rows resampled (paired across groups, for 'score'
    when all cells share their test rows) and each group's seeds resampled."""
    rng = np.random.default_rng(seed)
    ids = groups[0][0]["row_ids"] if groups and groups[0] else []
    paired = metric == "score" and bool(ids) and all(r["row_ids"] == ids for g in groups for r in g)
    rows = rng.integers(0, len(ids), size=(resamples, len(ids))) if paired else None
    out = np.empty((resamples, len(groups)))
    for j, group in enumerate(groups):
        seeds = rng.integers(0, len(group), size=(resamples, len(group)))
        if paired:
            per_seed = np.array([r["row_scores"] for r in group], dtype=float)[:, rows].mean(axis=2)
            out[:, j] = per_seed[seeds, np.arange(resamples)[:, None]].mean(axis=1)
        else:
            out[:, j] = np.array([cell_value(r, metric) for r in group])[seeds].mean(axis=1)
    return out


def _quantiles(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Return the percentile interval by rank (so +inf, 'not reached', may be the upper end)."""
    ordered = np.sort(values)
    tail = (1 - level) / 2 * (len(ordered) - 1)
    return float(ordered[int(math.floor(tail))]), float(ordered[int(math.ceil(len(ordered) - 1 - tail))])


def curve_label(record: dict, varying: dict[str, set]) -> str:
    """Return the method plus the settings that vary among that method's cells."""
    parts = [record["method"]] + [_setting(k, record.get(k)) for k in RELEVANT[record["method"]]
                                  if len(varying.get(record["method"], {}).get(k, ())) > 1]
    return ", ".join(parts)


def _setting(key: str, value) -> str:
    """Return 'ratio 10', 'lr 0.001'; a general-token budget reads as itself ('general 3e5 tok')."""
    return value if key == "ratio" and str(value).startswith("general ") else f"{key} {value}"


_NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?)")


def natural_key(label: str) -> tuple:
    """Return a sort key that orders the numbers in a label by value: 'general 3e4 tok' before 'general 1e5
    tok', '15 rows' before '115 rows' (text order puts them the other way)."""
    parts = _NUMBER.split(label)
    return tuple((0, float(part), "") if i % 2 else (1, 0.0, part) for i, part in enumerate(parts))


def varying_settings(records: list[dict]) -> dict[str, dict[str, set]]:
    """Return {method: {setting: distinct values}} over the records."""
    out = defaultdict(lambda: defaultdict(set))
    for r in records:
        for k in SETTINGS:
            out[r["method"]][k].add(r.get(k))  # .get: records written before a setting existed
    return out


def curve_points(records: list[dict], metric: str, x_key: str, curve_of, point_of, resamples: int,
                 seed: int = 0) -> dict[str, list[Point]]:
    """Return {curve: points sorted by x}; a point averages the cells (seeds) sharing curve and point keys."""
    groups = defaultdict(list)
    for r in records:
        groups[(curve_of(r), point_of(r))].append(r)
    keys = list(groups)
    if not keys:
        return {}
    samples = resampled_means([groups[k] for k in keys], metric, resamples, seed)
    curves = defaultdict(list)
    for j, key in enumerate(keys):
        cells = groups[key]
        low, high = _quantiles(samples[:, j])
        if len(cells) == 1 and metric != "score" and metric in cells[0]["metrics"].get("ci95", {}):
            low, high = cells[0]["metrics"]["ci95"][metric]  # one seed: the metric's own test-row interval
        curves[key[0]].append(Point(key[0], float(np.mean([r[x_key] for r in cells])),
                                    float(np.mean([cell_value(r, metric) for r in cells])), low, high, tuple(cells)))
    return {c: sorted(points, key=lambda p: p.x) for c, points in curves.items()}


# --- token-efficiency multiplier -------------------------------------------------------------------

def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> tuple[float, bool] | None:
    """Return (task tokens at which the curve first reaches `target`, True if only an upper bound), or None.

    The curve is (tokens, score) points, interpolated linearly in log10(tokens). When its smallest point
    already reaches the target, that size is returned as an upper bound; None means never reached.
    """
    points = sorted(p for p in curve if p[0] > 0)
    if not points:
        return None
    if points[0][1] >= target:
        return points[0][0], True
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 < target <= y1:
            fraction = (target - y0) / (y1 - y0)
            return 10 ** (math.log10(x0) + fraction * (math.log10(x1) - math.log10(x0))), False
    return None


def _multiple(hit: tuple[float, bool] | None, tokens: float) -> float:
    return hit[0] / tokens if hit else math.inf


def efficiency(records: list[dict], metric: str, resamples: int, seed: int = 0) -> list[dict]:
    """Return one row per TELL point: the SFT task tokens reaching its score as a multiple of its task
    tokens (multiplier), with a bootstrap interval; multiplier None = SFT never gets there."""
    tell = [r for r in records if r["method"] == "tell" and r["task_tokens"] > 0]
    sft = [r for r in records if r["method"] == "sft" and r["task_tokens"] > 0]
    if not tell or not sft:
        return []
    varying = varying_settings(records)
    tell_groups = defaultdict(list)
    for r in tell:
        tell_groups[(curve_label(r, varying), r["size"])].append(r)
    out = []
    for (label, size), cells in tell_groups.items():
        same_lr = [r for r in sft if r["lr"] == cells[0]["lr"]] or sft
        by_size = defaultdict(list)
        for r in same_lr:
            by_size[r["size"]].append(r)
        sft_groups = list(by_size.values())
        samples = resampled_means([cells] + sft_groups, metric, resamples, seed)
        xs = [float(np.mean([r["task_tokens"] for r in g])) for g in sft_groups]
        x = float(np.mean([r["task_tokens"] for r in cells]))
        y = float(np.mean([cell_value(r, metric) for r in cells]))
        curve = [(xk, float(np.mean([cell_value(r, metric) for r in g]))) for xk, g in zip(xs, sft_groups)]
        reach = tokens_to_reach(curve, y)
        boot = np.array([_multiple(tokens_to_reach(list(zip(xs, s[1:])), s[0]), x) for s in samples])
        out.append({"label": label, "size": size, "task_tokens": x, "score": y, "seeds": len(cells),
                    "general_tokens": float(np.mean([r["general_tokens"] for r in cells])),
                    "sft_tokens": reach[0] if reach else None, "at_most": bool(reach and reach[1]),
                    "multiplier": reach[0] / x if reach else None, "ci95": list(_quantiles(boot)),
                    "below_majority": cells_below_majority(cells),
                    "sft_best": max(curve, key=lambda p: p[1]), "sft_lr_matched": same_lr is not sft})
    return sorted(out, key=lambda e: (natural_key(e["label"]), e["task_tokens"]))
