"""Stage 8 — report, for sweeps: curves, the token-efficiency multiplier and report.md/.html. Never trains.

In: one flat record per finished sweep cell (method, size, settings, task/general tokens, per-row scores), as
``sweep.result_rows`` returns them. Out: PNG plots (log-x where tokens are on the axis, 95% bootstrap bands),
the multiplier table (the SFT task tokens that reach each TELL point's score, as a multiple of TELL's task
tokens; computed in sweep_stats.py) and ``report.md`` + ``report.html``. Pure functions of the records, apart
from writing files.
"""
from __future__ import annotations

import math
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np

from tell.report import ZERO_ADAPTER_MARK, ZERO_ADAPTER_WHY, below_majority, label_counts_text, markdown_html
from tell.sweep_stats import (RELEVANT, SETTINGS, Point, cell_value, cells_below_majority, curve_label, curve_points,
                              efficiency, natural_key, varying_settings)

METHOD_ORDER = ("base", "base-anchor", "general", "sft", "sft-matched", "tell")


def _times(value: float) -> str:
    return "not reached" if math.isinf(value) else f"{value:.3g}×"


def efficiency_table(rows: list[dict]) -> str:
    """Return the multiplier rows as a Markdown table."""
    lines = ["| TELL point | task tokens | general tokens | score | SFT tokens to match | multiplier [95%] |",
             "|---|---|---|---|---|---|"]
    for e in rows:
        if e["multiplier"] is None:
            best_y = e["sft_best"][1]
            multiplier = f"not reached (SFT's best: {best_y:.3g} at {e['sft_best'][0]:,.0f} tokens)"
            sft_tokens = "–"
        else:
            multiplier = ("≤ " if e["at_most"] else "") + _times(e["multiplier"])
            sft_tokens = ("≤ " if e["at_most"] else "") + f"{e['sft_tokens']:,.0f}"
        ci = f" [{_times(e['ci95'][0])}, {_times(e['ci95'][1])}]"
        below = " **< majority**" if e.get("below_majority") else ""
        lines.append(f"| {e['label']} ({e['size']}) | {e['task_tokens']:,.0f} | {e['general_tokens']:,.0f} | "
                     f"{e['score']:.3f}{below} | {sft_tokens} | {multiplier}{ci} |")
    return "\n".join(lines)


# --- plots -----------------------------------------------------------------------------------------

def _axes(figsize=(7, 4.2)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=figsize)
    return plt, fig, ax


def _draw_curves(ax, curves: dict[str, list[Point]], style: str = "-o") -> None:
    for i, (label, points) in enumerate(sorted(curves.items(), key=lambda c: natural_key(c[0]))):
        xs = [p.x for p in points]
        ax.fill_between(xs, [p.low for p in points], [p.high for p in points], color=f"C{i}", alpha=0.18, lw=0)
        ax.plot(xs, [p.y for p in points], style, color=f"C{i}", label=label, ms=4)
    below = [p for points in curves.values() for p in points if cells_below_majority(p.cells)]
    if below:  # one legend entry for all of them
        ax.plot([p.x for p in below], [p.y for p in below], "x", color="red", ms=9, mew=2, ls="none",
                label="label accuracy < majority baseline")


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 80), fontsize=9 if len(title) > 80 else 10)  # long ablation settings wrap
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_setting(records: list[dict]) -> dict:
    """Return the settings of the ablation: those of the controls that share TELL's general data (`general`, else
    `sft-matched` cells), else the most common TELL ones."""
    pool = ([r for r in records if r["method"] == "general"] or [r for r in records if r["method"] == "sft-matched"]
            or [r for r in records if r["method"] == "tell"])
    if not pool:
        return {}
    common = Counter(tuple(r.get(k) for k in SETTINGS) for r in pool).most_common(1)[0][0]
    return dict(zip(SETTINGS, common))


def _matches(record: dict, setting: dict, skip: tuple = ()) -> bool:
    return all(record.get(k) == v for k, v in setting.items() if k in RELEVANT[record["method"]] and k not in skip)


def plot_task_tokens(records, metric, path: Path, resamples: int) -> bool:
    """Write task tokens (log) vs score: SFT, SFT-matched and TELL curves, base as a band (paper Fig. 7/8)."""
    trained = [r for r in records if r["method"] in ("sft", "sft-matched", "tell") and r["task_tokens"] > 0]
    if not trained:
        return False
    varying = varying_settings(records)
    plt, fig, ax = _axes()
    _draw_curves(ax, curve_points(trained, metric, "task_tokens", lambda r: curve_label(r, varying),
                                  lambda r: r["size"], resamples))
    _base_band(ax, records, metric, resamples)
    ax.set_xscale("log")
    _finish(plt, fig, ax, path, "task tokens (log)", metric, "Task tokens vs score (bands: 95% bootstrap)")
    return True


def _base_band(ax, records, metric, resamples) -> None:
    base = [r for r in records if r["method"] == "base"]
    if base:
        point = curve_points(base, metric, "task_tokens", lambda r: "base", lambda r: "", resamples)["base"][0]
        ax.axhspan(point.low, point.high, color="grey", alpha=0.15, lw=0)
        ax.axhline(point.y, color="grey", ls="--", lw=1, label="base (untrained)")


def plot_general_tokens(records, metric, path: Path, resamples: int) -> bool:
    """Write general tokens (log) vs score, one TELL curve per task size (paper Fig. 11/12)."""
    setting = main_setting(records)
    tell = [r for r in records if r["method"] == "tell" and r["general_tokens"] > 0
            and _matches(r, setting, skip=("ratio",))]
    if not tell:
        return False
    plt, fig, ax = _axes()
    curves = curve_points(tell, metric, "general_tokens", lambda r: f"TELL, {r['size']}", lambda r: r["ratio"],
                          resamples)
    _draw_curves(ax, curves)
    for i, label in enumerate(sorted(curves, key=natural_key)):
        size = label.split(", ", 1)[1]
        sft = [r for r in records if r["method"] == "sft" and r["size"] == size]
        if sft:
            ax.axhline(np.mean([cell_value(r, metric) for r in sft]), color=f"C{i}", ls=":", lw=1,
                       label=f"SFT, {size}")
    ax.set_xscale("log")
    _finish(plt, fig, ax, path, "general tokens (log)", metric, "General tokens vs score per task size")
    return True


def plot_anchor(records, metric, path: Path, resamples: int) -> bool:
    """Write task tokens vs score of TELL per anchor (none / manual / self-instruct, placement) (Fig. 5/6/16)."""
    setting = main_setting(records)
    tell = [r for r in records if r["method"] == "tell" and _matches(r, setting, skip=("anchor", "placement"))]
    if len({(r["anchor"], r["placement"]) for r in tell}) < 2:
        return False
    plt, fig, ax = _axes()
    _draw_curves(ax, curve_points(tell, metric, "task_tokens", lambda r: f"anchor {r['anchor']}, {r['placement']}",
                                  lambda r: r["size"], resamples))
    ax.set_xscale("log")
    _finish(plt, fig, ax, path, "task tokens (log)", metric, "TELL with and without an anchor")
    return True


def plot_ablation(records, metric, path: Path, resamples: int) -> bool:
    """Write bars per task size: base, general-only, SFT, TELL (and controls) at one setting (Fig. 9/10)."""
    setting = main_setting(records)
    chosen = [r for r in records if _matches(r, setting)]
    sizes = sorted({r["size"] for r in chosen if r["method"] == "tell"}, key=lambda s: (len(s), s))
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in chosen)]
    if not sizes or len(methods) < 2:
        return False
    points = curve_points(chosen, metric, "task_tokens", lambda r: r["method"],
                          lambda r: "" if r["method"] in ("base", "base-anchor") else r["size"], resamples)
    plt, fig, ax = _axes((max(6.0, 1.4 * len(sizes) * len(methods) / 2), 4.2))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        by_size = {p.cells[0]["size"]: p for p in points.get(method, [])}
        for s, size in enumerate(sizes):
            p = next(iter(by_size.values())) if method in ("base", "base-anchor") and by_size else by_size.get(size)
            if p is not None:
                below = cells_below_majority(p.cells)
                ax.bar(s + (i - (len(methods) - 1) / 2) * width, p.y, width,
                       yerr=[[max(p.y - p.low, 0)], [max(p.high - p.y, 0)]], capsize=3, color=f"C{i}",
                       label=method if s == 0 else None, hatch="//" if below else None,
                       edgecolor="black" if below else None)  # red bars exist (C3): black hatching marks < majority
    ax.set_xticks(range(len(sizes)), sizes)
    _finish(plt, fig, ax, path, "task size", metric, "Ablation: " + ", ".join(f"{k} {v}" for k, v in setting.items()))
    return True


# --- the report ------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cells_table(records: list[dict], metric: str) -> str:
    """Return every finished cell as a Markdown table row: settings, tokens, score, retention, wall time."""
    head = ["cell", "method", "size", "task tokens", "general tokens", metric, "task metrics", "majority baseline",
            "predicted labels", "distinct outputs", "anchor copy", "target copy", "steps", "general loss",
            "general ppl", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m = r["metrics"]
        label = r["label"] + (f" **{ZERO_ADAPTER_MARK}**" if m.get("same_as_base") else "")
        lines.append("| " + " | ".join([label, r["method"], r["size"], f"{r['task_tokens']:,}",
                                         f"{r['general_tokens']:,}", f"{cell_value(r, metric):.3f}", _task_metrics(m),
                                         _fmt(m.get("majority_baseline", "–")),
                                         label_counts_text(m.get("predicted_label_counts")),
                                         *[_fmt(m.get(k, "–")) for k in ("distinct_output_fraction",
                                                                         "anchor_copy_rate", "target_copy_rate")],
                                         str(m.get("optimizer_steps", 0)), _fmt(m.get("general_loss", "–")),
                                         _fmt(m.get("general_ppl", "–")), _fmt(r["wall_s"] or 0.0)]) + " |")
    if any(r["metrics"].get("same_as_base") for r in records):
        lines += ["", ZERO_ADAPTER_NOTE]
    return "\n".join(lines)


ZERO_ADAPTER_NOTE = (f"**{ZERO_ADAPTER_MARK}**: the cell's trained adapter is exactly zero ({ZERO_ADAPTER_WHY}), so "
                     "it is the base model without an anchor. Its answers and held-out losses are generated once: a "
                     "`base` cell on the same test rows reuses them from the evaluation cache (its wall time is "
                     "seconds).")


TASK_METRICS = {"json_adherence_strict": "JSON strict", "json_adherence_lenient": "JSON lenient",
                "label_accuracy": "label acc", "chrf": "chrF++", "bleu": "BLEU", "exact_match": "exact",
                "regex_match": "regex"}


def _task_metrics(metrics: dict) -> str:
    """Return the task's own headline metrics of a cell, e.g. 'JSON lenient 0.021, label acc 0.000'."""
    text = ", ".join(f"{name} {metrics[key]:.3f}" for key, name in TASK_METRICS.items()
                     if isinstance(metrics.get(key), (int, float))) or "–"
    return text + (" **< majority**" if below_majority(metrics) else "")


def retention_table(records: list[dict]) -> str:
    """Return held-out general loss per cell and its change against the untrained base model."""
    base = [r["metrics"]["general_loss"] for r in records if r["method"] == "base" and "general_loss" in r["metrics"]]
    reference = float(np.mean(base)) if base else None
    lines = ["| cell | general loss (nats/token) | perplexity | change vs base |", "|---|---|---|---|"]
    for r in records:
        m = r["metrics"]
        if "general_loss" not in m:
            continue
        change = f"{m['general_loss'] - reference:+.4f}" if reference is not None else "–"
        lines.append(f"| {r['label']} | {m['general_loss']:.4f} | {m['general_ppl']:.3f} | {change} |")
    return "\n".join(lines) if len(lines) > 2 else "(no held-out general loss in these cells)"


def points_table(curves: dict[str, list[Point]], x_name: str) -> str:
    lines = [f"| curve | {x_name} | score [95%] | seeds | label accuracy < majority |", "|---|---|---|---|---|"]
    for label, points in sorted(curves.items(), key=lambda c: natural_key(c[0])):
        lines += [f"| {label} | {p.x:,.0f} | {p.y:.3f} [{p.low:.3f}, {p.high:.3f}] | {len(p.cells)} | "
                  f"{'**yes**' if cells_below_majority(p.cells) else 'no'} |" for p in points]
    return "\n".join(lines)


def status_text(status: dict) -> str:
    """Return the status as a few lines of text (what `tell sweep --status` prints)."""
    hours, rest = divmod(status["estimate_left_s"], 3600)
    rates = status["rates"]
    general = f", {rates['train_tok_s_general']:g} with general rows" if "train_tok_s_general" in rates else ""
    lines = [f"cells: {status['cells']}  done: {status['done']}  running: {status['running']}  "
             f"left: {status['left']} (failed: {status['failed']})",
             f"estimated time left: {hours} h {rest // 60:02d} min (training {rates['train_tok_s']:g} tok/s{general}, "
             f"{rates['eval_s_per_row']:g} s per test row at 192 new tokens)"]
    lines += [f"running: {c['key']} {c['label']} (pid {c['pid']} on {c['host']}, {c['elapsed_s']} s"
              + _steps(c.get("training")) + ")" for c in status["running_cells"]]
    lines += [f"interrupted: {c['key']} {c['label']} ({_steps(c['training'])[2:]}; resumes from its last checkpoint)"
              for c in status.get("interrupted_cells", ())]
    lines += [f"failed: {c['key']} {c['label']}: {c['error']}" for c in status["failed_cells"]]
    return "\n".join(lines)


DIAGNOSTICS_NOTE = ("Judging or copying: majority baseline = label accuracy of always answering the test rows' most "
                    "frequent label (**< majority** marks a cell or point under it, as do red crosses and hatched "
                    "bars in the plots); predicted labels as the schema spells them (`none`: no label); distinct "
                    "outputs ÷ rows; anchor / target copy = answers with 8 consecutive words of the cell's anchor "
                    "/ of a task target it trained on.")


def _steps(training: dict | None) -> str:
    return f", training step {training['steps_done']}/{training['steps_planned']}" if training else ""


PLOTS = (("task_tokens.png", plot_task_tokens, "Task tokens vs score — TELL and SFT (paper Fig. 7/8)"),
         ("general_tokens.png", plot_general_tokens, "General tokens vs score per task size (Fig. 11/12)"),
         ("ablation.png", plot_ablation, "Ablation: base, general-only, SFT, TELL (Fig. 9/10)"),
         ("anchor.png", plot_anchor, "Anchor vs no anchor, manual vs self-instruct (Fig. 5/6/16)"))


def render_sweep_report(records: list[dict], status: dict, out_dir: Path, metric: str = "score",
                        resamples: int = 1000) -> Path:
    """Write every plot, report.md and report.html of a sweep into out_dir; return report.md's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = efficiency(records, metric, resamples)
    task = records[0]["task"] if records else "?"
    parts = [f"# tell sweep — {task}", "",
             f"{status['done']} of {status['cells']} cells done, {status['running']} running, {status['left']} left "
             f"({status['failed']} failed). Score: `{metric}`"
             + (" (mean per-row task score)" if metric == "score" else "") + ". Bands and brackets: 95% bootstrap "
             + ("intervals over test rows (paired across cells) and seeds." if metric == "score" else
                "intervals over seeds only (per-row values are stored for `score` alone): a one-seed point "
                "has none."), "",
             "## Token-efficiency multiplier", "",
             "For every TELL point, the SFT task tokens that reach the same score — interpolated on the SFT curve "
             "in log-token space (SFT cells at the same learning rate when there are any) — as a multiple of "
             "TELL's task tokens. `≤` marks a score SFT already reaches at its smallest size; `not reached`, one "
             "SFT never reaches in this sweep.", "",
             efficiency_table(rows) if rows else "(needs finished `tell` and `sft` cells)", ""]
    for name, plot, title in PLOTS:
        if records and plot(records, metric, out_dir / name, resamples):
            parts += [f"## {title}", "", f"![{title}]({name})", ""]
        elif (out_dir / name).exists():
            (out_dir / name).unlink()  # a stale plot from an earlier render would contradict the tables
    varying = varying_settings(records)
    curves = curve_points([r for r in records if r["task_tokens"] > 0], metric, "task_tokens",
                          lambda r: curve_label(r, varying), lambda r: r["size"], resamples)
    parts += ["## Points (mean over seeds)", "", points_table(curves, "task tokens") if curves else "(none)", "",
              "## General-ability retention", "",
              "Loss on held-out general rows (answer tokens only, as in training): what each fine-tune cost.", "",
              retention_table(records), "", "## All cells", "", DIAGNOSTICS_NOTE, "", cells_table(records, metric), ""]
    text = "\n".join(parts)
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    (out_dir / "report.html").write_text(markdown_html(text, f"tell sweep — {task}"), encoding="utf-8")
    return out_dir / "report.md"
