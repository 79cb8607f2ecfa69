"""Stage 8 — report: turn results into tables, charts and Markdown. Never trains or generates.

In: per-arm metrics (as written to results.json) and a summary. Out: ``report.md`` with the table,
the wall time per stage and a reading of the result, and ``compare.png``: one bar group per headline
metric with 95% bootstrap intervals.
"""
from __future__ import annotations

from pathlib import Path

HEADLINE_KEYS = ("json_adherence_strict", "json_adherence_lenient", "label_accuracy", "label_f1",
                 "chrf", "bleu", "exact_match", "regex_match")
PERCENT_KEYS = {"json_adherence_strict", "json_adherence_lenient", "label_accuracy", "label_f1",
                "exact_match", "regex_match"}


def headline_keys(results: dict) -> list[str]:
    """Return the headline metric keys present in every arm's results."""
    arms = [m for m in results.values()]
    return [k for k in HEADLINE_KEYS if arms and all(k in m for m in arms)]


def _cell(metrics: dict, key: str) -> str:
    value, ci = metrics[key], metrics.get("ci95", {}).get(key)
    scale, unit = (100, "%") if key in PERCENT_KEYS else (1, "")
    text = f"{value * scale:.1f}{unit}"
    return text + (f" [{ci[0] * scale:.1f}, {ci[1] * scale:.1f}]" if ci else "")


def compare_table(results: dict) -> str:
    """Return a Markdown table: one row per arm, headline metrics with 95% intervals, steps and tokens."""
    keys = headline_keys(results)
    head = ["arm"] + keys + ["optimizer steps", "task tokens", "general tokens", "trained tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, m in results.items():
        cells = [arm] + [_cell(m, k) for k in keys] + [str(m.get("optimizer_steps", 0)), f"{m.get('task_tokens', 0):,}",
                                                      f"{m.get('general_tokens', 0):,}", f"{m.get('trained_tokens', 0):,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_compare(results: dict, png_path: Path) -> None:
    """Write a grouped bar chart of the headline metrics per arm with 95% interval whiskers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    keys = headline_keys(results)
    arms = list(results)
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.2 * max(len(keys), 1), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        scale = 100 if key in PERCENT_KEYS else 1
        values = np.array([results[a][key] * scale for a in arms])
        cis = [results[a].get("ci95", {}).get(key, [results[a][key]] * 2) for a in arms]
        err = np.array([[v - lo * scale for v, (lo, _) in zip(values, cis)],
                        [hi * scale - v for v, (_, hi) in zip(values, cis)]]).clip(min=0)
        bars = ax.bar(range(len(arms)), values, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(arms))])
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
        top = float((values + err[1]).max()) if len(values) else 0.0
        ax.set_ylim(0, 100 if scale == 100 else max(top * 1.25, 1.0))
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        ax.set_title(key + (" (%)" if scale == 100 else ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Arms on the same test rows (bars: 95% bootstrap interval)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def _overlap(a: list[float] | None, b: list[float] | None) -> bool:
    return bool(a and b) and a[0] <= b[1] and b[0] <= a[1]


def reading(results: dict) -> list[str]:
    """Return one sentence per headline metric: TELL against each other arm, and whether intervals overlap."""
    if "tell" not in results:
        return []
    lines = []
    for key in headline_keys(results)[:3]:
        scale, unit = (100, " points") if key in PERCENT_KEYS else (1, "")
        tell = results["tell"]
        parts = []
        for arm, m in results.items():
            if arm == "tell":
                continue
            diff = (tell[key] - m[key]) * scale
            same = _overlap(tell.get("ci95", {}).get(key), m.get("ci95", {}).get(key))
            parts.append(f"{diff:+.1f}{unit} vs {arm}" + (" (intervals overlap)" if same else " (intervals apart)"))
        lines.append(f"- `{key}`: tell " + "; ".join(parts) + ".")
    return lines


def write_compare_report(results: dict, summary: dict, out_dir: str | Path) -> None:
    """Write report.md and compare.png for a `tell compare` run into out_dir."""
    out_dir = Path(out_dir)
    plot_compare(results, out_dir / "compare.png")
    stage_lines = [f"| {arm} | {t.get('train_s', '–')} | {t.get('eval_s', '–')} |"
                   for arm, t in summary["stage_wall_s"].items()]
    text = f"""# tell compare — {summary['task']}

{summary['task_rows']} task rows, general:task ratio {summary['ratio']}, {summary['test_rows']} test rows
(the same seeded sample for every arm). Anchor: `{summary['anchor']}`{' — **quick mode**' if summary['quick'] else ''}.

{compare_table(results)}

Fractions in %, chrF/BLEU on sacrebleu's 0–100 scale; brackets: 95% bootstrap interval.
Arms: `base` untrained; `base-anchor` untrained with the anchor in the prompt; `sft` task rows only
(the paper's setting); `sft-matched` task rows repeated for TELL's number of optimizer steps; `tell`
anchor + token-ratio shuffle; `general` TELL's general rows without the task rows.

![arms](compare.png)

## What it shows

{chr(10).join(reading(results)) or "- (no `tell` arm in this run)"}

"Intervals apart" means the two 95% bootstrap intervals do not overlap — a difference unlikely to be noise
on these test rows; overlapping intervals mean this run cannot tell the arms apart.

## Wall time per stage (s)

| arm | train | eval |
|---|---|---|
{chr(10).join(stage_lines)}

Total: {summary['wall_s']} s (cached arms count as ~0).
"""
    (out_dir / "report.md").write_text(text, encoding="utf-8")
