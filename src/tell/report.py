"""Stage 8 — report: turn results into tables, charts and Markdown. Never trains or generates.

In: per-arm metrics (as written to results.json) and a summary. Out: ``report.md`` with the table,
the wall time per stage and a reading of the result, and ``compare.png``: one bar group per headline
metric with 95% bootstrap intervals. ``markdown_html`` turns the Markdown these reports write into one page.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

HEADLINE_KEYS = ("json_adherence_strict", "json_adherence_lenient", "label_accuracy", "label_f1",
                 "chrf", "bleu", "exact_match", "regex_match")
PERCENT_KEYS = {"json_adherence_strict", "json_adherence_lenient", "label_accuracy", "label_f1",
                "exact_match", "regex_match"}


# The accuracy that majority_baseline is the floor of: the label accuracy, or exact match of a label task.
ACCURACY_KEYS = ("label_accuracy", "exact_match")
DIAGNOSTIC_KEYS = ("majority_baseline", "predicted_label_counts", "distinct_output_fraction", "anchor_copy_rate",
                   "target_copy_rate")


def label_accuracy_of(metrics: dict) -> float | None:
    """Return the accuracy that majority_baseline bounds (label accuracy or exact match), or None."""
    return next((float(metrics[k]) for k in ACCURACY_KEYS if isinstance(metrics.get(k), (int, float))), None)


def below_majority(metrics: dict) -> bool:
    """Return True when the label accuracy is under majority_baseline: always answering the test rows' most
    frequent label would score better, so the labels carry no sign of judging."""
    accuracy, majority = label_accuracy_of(metrics), metrics.get("majority_baseline")
    return accuracy is not None and majority is not None and accuracy < majority


def label_counts_text(counts: dict | None) -> str:
    """Return predicted_label_counts as 'yes 37 / no 0 / none 11' (a dash when absent)."""
    return " / ".join(f"{k} {v}" for k, v in counts.items()) if counts else "–"


def headline_keys(results: dict) -> list[str]:
    """Return the headline metric keys present in every arm's results."""
    arms = [m for m in results.values()]
    return [k for k in HEADLINE_KEYS if arms and all(k in m for m in arms)]


def _cell(metrics: dict, key: str) -> str:
    value, ci = metrics[key], metrics.get("ci95", {}).get(key)
    scale, unit = (100, "%") if key in PERCENT_KEYS else (1, "")
    text = f"{value * scale:.1f}{unit}"
    text += f" [{ci[0] * scale:.1f}, {ci[1] * scale:.1f}]" if ci else ""
    if key in ACCURACY_KEYS and below_majority(metrics):
        text += f" **< majority {metrics['majority_baseline'] * 100:.1f}%**"
    return text


def _rate(metrics: dict, key: str) -> str:
    return f"{metrics[key] * 100:.1f}%" if isinstance(metrics.get(key), (int, float)) else "–"


def diagnostics_table(results: dict) -> str:
    """Return a Markdown table of every arm's diagnostics (empty when no arm has any)."""
    if not any(k in m for m in results.values() for k in DIAGNOSTIC_KEYS):
        return ""
    lines = ["| arm | label accuracy | majority baseline | below majority | predicted labels | distinct outputs "
             "| anchor copy | target copy |", "|---|---|---|---|---|---|---|---|"]
    for arm, m in results.items():
        accuracy = label_accuracy_of(m)
        lines.append(f"| {arm} | {'–' if accuracy is None else f'{accuracy * 100:.1f}%'} | "
                     f"{_rate(m, 'majority_baseline')} | {'**yes**' if below_majority(m) else 'no'} | "
                     f"{label_counts_text(m.get('predicted_label_counts'))} | {_rate(m, 'distinct_output_fraction')} "
                     f"| {_rate(m, 'anchor_copy_rate')} | {_rate(m, 'target_copy_rate')} |")
    return "\n".join(lines)


def compare_table(results: dict) -> str:
    """Return a Markdown table: one row per arm, headline metrics with 95% intervals, steps and tokens."""
    keys = headline_keys(results)
    head = ["arm"] + keys + ["optimizer steps", "task tokens", "general tokens", "trained tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, m in results.items():
        label = f"{arm} {ZERO_ADAPTER_MARK}" if m.get("same_as_base") else arm
        cells = [label] + [_cell(m, k) for k in keys] + [str(m.get("optimizer_steps", 0)), f"{m.get('task_tokens', 0):,}",
                                                      f"{m.get('general_tokens', 0):,}", f"{m.get('trained_tokens', 0):,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + _retention_lines(results)


def _retention_lines(results: dict) -> str:
    """Return the held-out general loss per arm (what each fine-tune cost), or nothing if none was measured."""
    arms = {arm: m for arm, m in results.items() if "general_loss" in m}
    if not arms:
        return ""
    base = arms.get("base", {}).get("general_loss")
    lines = ["", "", "Held-out general rows (loss on answer tokens, lower is better):", "",
             "| arm | general loss | perplexity | change vs base |", "|---|---|---|---|"]
    for arm, m in arms.items():
        change = f"{m['general_loss'] - base:+.4f}" if base is not None else "–"
        lines.append(f"| {arm} | {m['general_loss']:.4f} | {m['general_ppl']:.3f} | {change} |")
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
        if key in ACCURACY_KEYS:
            _mark_majority(ax, [results[a] for a in arms], bars)
        top = float((values + err[1]).max()) if len(values) else 0.0
        ax.set_ylim(0, 100 if scale == 100 else max(top * 1.25, 1.0))
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        ax.set_title(key + (" (%)" if scale == 100 else ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Arms on the same test rows (bars: 95% bootstrap interval)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def _mark_majority(ax, arm_metrics: list[dict], bars) -> None:
    """Draw the majority baseline on an accuracy panel and hatch the bars of arms below it."""
    majorities = [m["majority_baseline"] for m in arm_metrics if "majority_baseline" in m]
    if not majorities:
        return
    ax.axhline(max(majorities) * 100, color="k", ls="--", lw=1, label="majority baseline")
    for bar, m in zip(bars, arm_metrics):
        if below_majority(m):
            bar.set_hatch("//")
            bar.set_edgecolor("red")
    ax.legend(fontsize=7, loc="upper right", title="hatched: below", title_fontsize=7)


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


def _diagnostics_section(results: dict) -> str:
    table = diagnostics_table(results)
    if not table:
        return ""
    return f"""## Judging or copying?

{table}

Majority baseline: the label accuracy of always answering the test rows' most frequent label. Predicted labels
count the answers' labels as the schema spells them (another spelling, e.g. `Yes`, is its own label; `none`:
no label). Distinct outputs: different answers ÷ rows. Anchor copy / target copy: answers containing 8
consecutive words of the arm's anchor / of any task target it trained on (words split at whitespace,
lowercased, surrounding punctuation stripped).

"""


def write_compare_report(results: dict, summary: dict, out_dir: str | Path) -> None:
    """Write report.md and compare.png for a `tell compare` run into out_dir."""
    out_dir = Path(out_dir)
    plot_compare(results, out_dir / "compare.png")
    stage_lines = [f"| {arm} | {t.get('prepare_s', '–')} | {t.get('train_s', '–')} | {t.get('eval_s', '–')} | "
                   f"{t.get('general_loss_s', '–')} |" for arm, t in summary["stage_wall_s"].items()]
    chosen = summary.get("selection")
    chosen_line = (f"\nTask rows chosen by `{chosen['method']}` (seed {chosen['seed']}) from {chosen['pool_rows']} pool "
                   f"rows: pool lines {chosen['chosen_lines']}, coverage radius {chosen['coverage_radius']:.3f}."
                   if chosen else "")
    text = f"""# tell compare — {summary['task']}

{summary['task_rows']} task rows, general:task ratio {summary['ratio']}, {summary['test_rows']} test rows
(the same seeded sample for every arm). Anchor: `{summary['anchor']}`{' — **quick mode**' if summary['quick'] else ''}.{chosen_line}

{compare_table(results)}

Fractions in %, chrF/BLEU on sacrebleu's 0–100 scale; brackets: 95% bootstrap interval; **< majority**: label
accuracy under the majority baseline.{_same_as_base_note(results)}
Arms: `base` untrained; `base-anchor` untrained with the anchor in the prompt; `sft` task rows only
(the paper's setting); `sft-matched` task rows repeated for TELL's number of optimizer steps; `tell`
anchor + token-ratio shuffle; `general` TELL's general rows without the task rows.

![arms](compare.png)

{_diagnostics_section(results)}## What it shows

{chr(10).join(reading(results)) or "- (no `tell` arm in this run)"}

"Intervals apart" means the two 95% bootstrap intervals do not overlap — a difference unlikely to be noise
on these test rows; overlapping intervals mean this run cannot tell the arms apart.

## Wall time per stage (s)

`prepare`: test rows, training rows, TELL's mix (for its step count) and the held-out rows; per arm: training,
generation and scoring of the test rows, the held-out general loss.

| arm | prepare | train | eval | general loss |
|---|---|---|---|---|
{chr(10).join(stage_lines)}

Total: {summary['wall_s']} s (cached arms count as ~0).
{_compute_lines(results, summary)}"""
    (out_dir / "report.md").write_text(text, encoding="utf-8")


def _compute_lines(results: dict, summary: dict) -> str:
    """Return the lines saying where and how this comparison computed (machine, dtype, kernels)."""
    host = summary.get("machine") or {}
    if not host:
        return ""
    where = (f"{host.get('cpu', '?')}, {host.get('cpu_kind', '?')}, {host.get('threads', '?')} threads"
             if host.get("device") == "cpu" else f"{host.get('gpu', host.get('device'))}")
    train = next((m["train_compute_path"] for m in results.values() if m.get("train_compute_path")), None)
    gen = next((m["compute_path"] for m in results.values() if m.get("compute_path")), None)
    lines = [f"\nMachine: {where}; torch {host.get('torch', '?')}."]
    if train:
        lines.append(f"Training: {train['dtype']}, {train['attention']}, {train['lora']}, micro-batches of "
                     f"{train['micro_batch_tokens']} tokens.")
    if gen and "prefill" in gen:
        lines.append(f"Generation: {gen['dtype']}, batch {gen['batch_size']}, prefill: {gen['prefill']}; "
                     f"decode: {gen['decode']}.")
    return "\n".join(lines) + "\n"


# How a table marks an arm or sweep cell whose adapter is exactly zero, and why such an adapter happens.
ZERO_ADAPTER_MARK = "(= base: zero adapter)"
ZERO_ADAPTER_WHY = ("every LoRA B matrix is still 0 — as in the paper's SFT on a few rows: with batch 16 and warmup "
                    "0.03 they make one optimizer step, inside warmup, at learning rate 0")


def _same_as_base_note(results: dict) -> str:
    """Return a sentence naming the arms that are the base model (zero adapter) and were not evaluated again."""
    same = [arm for arm, m in results.items() if m.get("same_as_base")]
    if not same:
        return ""
    return (f"\n**{', '.join(f'`{a}`' for a in same)}: the trained adapter is exactly zero** ({ZERO_ADAPTER_WHY}), "
            "so the arm is the base model: its answers and losses are the base model's, generated once and reused.")


def rerender_compare_report(out_dir: str | Path) -> Path:
    """Return report.md of a `tell compare` directory after writing it, compare.png and report.html again
    from its results.json."""
    import json
    out_dir = Path(out_dir)
    results = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    summary = results.pop("_summary")
    write_compare_report(results, summary, out_dir)
    text = (out_dir / "report.md").read_text(encoding="utf-8")
    (out_dir / "report.html").write_text(markdown_html(text, f"tell compare — {summary['task']}"), encoding="utf-8")
    return out_dir / "report.md"


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def markdown_html(text: str, title: str) -> str:
    """Return a standalone HTML page of the Markdown this module writes (headings, tables, images, lists)."""
    body, table = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                tag = "th" if not table else "td"
                table.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            body.append("<table>" + "".join(table) + "</table>")
            table = []
        if match := re.match(r"(#+) (.*)", line):
            level = len(match.group(1))
            body.append(f"<h{level}>{_inline(match.group(2))}</h{level}>")
        elif match := re.match(r"!\[(.*)\]\((.*)\)", line):
            body.append(f'<p><img src="{html.escape(match.group(2))}" alt="{html.escape(match.group(1))}"></p>')
        elif line.startswith("- "):
            body.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
