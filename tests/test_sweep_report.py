"""Tests of tell.sweep_report on hand-made records (no model): interpolation of the SFT curve in log-token
space, the token-efficiency multiplier with its bootstrap interval and "not reached", and the rendered
report (Markdown + HTML + every plot the records support)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tell.sweep_report import markdown_html, render_sweep_report
from tell.sweep_stats import efficiency, natural_key, resampled_means, tokens_to_reach

N_ROWS = 40


def record(method: str, task_tokens: int, score: float, *, size: str = "", seed: int = 1, ratio: str = "10",
           anchor: str = "manual", general_tokens: int = 0, row_seed: int = 0) -> dict:
    """A finished cell whose N_ROWS per-row scores are 0/1 with the given mean."""
    ones = round(score * N_ROWS)
    scores = [1.0] * ones + [0.0] * (N_ROWS - ones)
    np.random.default_rng(row_seed).shuffle(scores)
    return {"key": f"{method}-{task_tokens}-{seed}-{ratio}-{anchor}", "label": f"{method} {size}", "method": method,
            "size": size or f"{task_tokens} rows", "task_rows": 1, "task_tokens": task_tokens,
            "general_tokens": general_tokens, "ratio": ratio, "anchor": anchor, "placement": "user-prefix",
            "order": "random", "lr": 1e-4, "seed": seed, "task": "hand-made",
            "metrics": {"n": N_ROWS, "optimizer_steps": 3, "general_loss": 2.0 + score, "general_ppl": 7.0},
            "row_ids": [f"r{i}" for i in range(N_ROWS)], "row_scores": scores, "anchor_text": "", "wall_s": 1.0}


def test_tokens_to_reach_interpolates_in_log_tokens():
    curve = [(1e3, 0.1), (1e4, 0.5), (1e5, 0.9)]
    assert tokens_to_reach(curve, 0.7) == (pytest.approx(10 ** 4.5), False)
    assert tokens_to_reach(curve, 0.5) == (pytest.approx(1e4), False)
    assert tokens_to_reach(list(reversed(curve)), 0.3) == (pytest.approx(10 ** 3.5), False)  # order-free
    assert tokens_to_reach(curve, 0.05) == (1e3, True)  # already at the smallest size: an upper bound
    assert tokens_to_reach(curve, 0.95) is None
    # a dip: the first crossing counts
    assert tokens_to_reach([(1e3, 0.0), (1e4, 0.6), (1e5, 0.2), (1e6, 0.8)], 0.5)[0] < 1e4


def sft_curve() -> list[dict]:
    return [record("sft", t, s) for t, s in ((1000, 0.1), (10_000, 0.5), (100_000, 0.9))]


def test_multiplier_of_a_tell_point_with_interval():
    rows = efficiency(sft_curve() + [record("tell", 1000, 0.7, general_tokens=10_000)], "score", 500)
    assert len(rows) == 1
    row = rows[0]
    assert row["sft_tokens"] == pytest.approx(10 ** 4.5)
    assert row["multiplier"] == pytest.approx(10 ** 4.5 / 1000)
    low, high = row["ci95"]
    assert low < row["multiplier"] < high and math.isfinite(high)
    assert not row["at_most"]


def test_multiplier_not_reached_and_at_most():
    rows = efficiency(sft_curve() + [record("tell", 1000, 0.95), record("tell", 2000, 0.05)], "score", 300)
    by_tokens = {r["task_tokens"]: r for r in rows}
    assert by_tokens[1000]["multiplier"] is None and by_tokens[1000]["sft_best"] == (100_000, 0.9)
    assert math.isinf(by_tokens[1000]["ci95"][1])  # most resamples never reach it either
    assert by_tokens[2000]["at_most"] and by_tokens[2000]["multiplier"] == pytest.approx(0.5)


def test_no_multiplier_without_both_curves():
    assert efficiency(sft_curve(), "score", 100) == []
    assert efficiency([record("tell", 1000, 0.5)], "score", 100) == []


def test_bootstrap_pairs_test_rows_and_resamples_seeds():
    same = [record("tell", 1000, 0.5)]
    draws = resampled_means([same, same], "score", 300)
    assert np.array_equal(draws[:, 0], draws[:, 1])  # the same rows are drawn for every group
    two_seeds = [record("tell", 1000, 0.2, seed=1), record("tell", 1000, 0.8, seed=2, row_seed=1)]
    spread = resampled_means([two_seeds], "score", 1000)[:, 0]
    assert spread.min() < 0.3 and spread.max() > 0.7  # a resample may draw one seed twice


def test_report_renders_markdown_html_and_plots(tmp_path):
    records = sft_curve() + [record("base", 0, 0.05, size="15 rows"), record("general", 0, 0.1, size="1000 rows",
                                                                               general_tokens=10_000)]
    for tokens, score in ((1000, 0.6), (10_000, 0.8)):
        for ratio, bump in (("10", 0.0), ("30", 0.05)):
            records.append(record("tell", tokens, score + bump, ratio=ratio, general_tokens=tokens * int(ratio)))
        records.append(record("tell", tokens, score - 0.3, anchor="none", general_tokens=tokens * 10))
    status = {"cells": len(records), "done": len(records), "running": 0, "left": 0, "failed": 0}
    report = render_sweep_report(records, status, tmp_path, "score", 200)
    text = report.read_text()
    assert text.index("Token-efficiency multiplier") < text.index("task_tokens.png")
    for name in ("task_tokens.png", "general_tokens.png", "ablation.png", "anchor.png", "report.html"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
        assert name == "report.html" or f"({name})" in text
    assert "General-ability retention" in text and "+0.0500" in text  # general loss vs base
    page = (tmp_path / "report.html").read_text()
    assert "<table>" in page and '<img src="task_tokens.png"' in page


def test_markdown_html_escapes_text():
    page = markdown_html("# a <b>\n\n| x | y |\n|---|---|\n| `1` | 2 |\n", "t")
    assert "&lt;b&gt;" in page and "<code>1</code>" in page and "<th>x</th>" in page


def test_cells_below_the_majority_baseline_are_marked_in_tables_and_plots(tmp_path, monkeypatch):
    from tell import sweep_report
    diagnostics = {"majority_baseline": 0.85, "predicted_label_counts": {"yes": 37, "no": 0, "none": 3},
                   "distinct_output_fraction": 0.05, "anchor_copy_rate": 0.9, "target_copy_rate": 0.8}
    records = sft_curve()
    for r in records:
        r["metrics"].update(diagnostics, label_accuracy=0.9)  # SFT above the baseline
    copying = record("tell", 1000, 0.1, general_tokens=10_000)
    copying["metrics"].update(diagnostics, label_accuracy=0.1)
    records.append(copying)
    assert sweep_report.cells_below_majority([copying]) and not sweep_report.cells_below_majority(records[:1])
    assert not sweep_report.cells_below_majority([record("tell", 1, 0.1)])  # a label-free cell never is
    marked = []
    real_plot = sweep_report._draw_curves

    def spy(ax, curves, style="-o"):
        real_plot(ax, curves, style)
        marked.extend(line.get_label() for line in ax.get_lines())
    monkeypatch.setattr(sweep_report, "_draw_curves", spy)
    status = {"cells": len(records), "done": len(records), "running": 0, "left": 0, "failed": 0}
    text = render_sweep_report(records, status, tmp_path, "score", 100).read_text()
    tell_lines = [line for line in text.splitlines() if line.startswith("| tell")]
    assert "0.100 **< majority**" in tell_lines[0]  # the multiplier table
    row = next(line for line in tell_lines if "| tell | 1000 rows |" in line)  # the table of all cells
    assert "label acc 0.100 **< majority**" in row and "yes 37 / no 0 / none 3" in row and "| 0.85 |" in row
    assert "| 0.05 | 0.9 | 0.8 |" in row
    assert any(line.startswith("| tell | 1,000 |") and line.endswith("| **yes** |") for line in tell_lines)
    assert sum("**< majority**" in line for line in text.splitlines() if line.startswith("| sft ")) == 0
    assert "label accuracy < majority baseline" in marked  # the red crosses' legend entry


def test_curves_and_points_are_ordered_by_the_numbers_in_their_labels(tmp_path):
    """Text order would put 'general 1e5 tok' before 'general 3e4 tok' and '115 rows' before '15 rows'."""
    assert sorted(["TELL, 115 rows", "TELL, 15 rows"], key=natural_key) == ["TELL, 15 rows", "TELL, 115 rows"]
    assert sorted(["lr 0.001", "lr 0.0001", "lr 1e-5"], key=natural_key) == ["lr 1e-5", "lr 0.0001", "lr 0.001"]
    budgets = ("1e4", "1e5", "3e4", "1e6", "3e5")
    records = [record("tell", 8_000, 0.1 * i, size="15 rows", ratio=f"general {b} tok", general_tokens=int(float(b)))
               for i, b in enumerate(budgets)]
    status = {"cells": len(records), "done": len(records), "running": 0, "left": 0, "failed": 0}
    text = render_sweep_report(records, status, tmp_path, "score", 50).read_text()
    points = text.split("## Points", 1)[1].split("##", 1)[0]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in points.splitlines() if line.startswith("| tell")]
    assert rows == [f"tell, general {b} tok" for b in ("1e4", "3e4", "1e5", "3e5", "1e6")]


def test_a_zero_adapter_cell_is_marked_as_the_base_model(tmp_path):
    """SFT on a few rows at the paper's settings trains a zero adapter: the table must say it is the base model."""
    records = sft_curve()
    records[0]["metrics"]["same_as_base"] = "the adapter is exactly zero"
    status = {"cells": len(records), "done": len(records), "running": 0, "left": 0, "failed": 0}
    text = render_sweep_report(records, status, tmp_path, "score", 50).read_text()
    cells = text.split("## All cells", 1)[1]
    marked = [line for line in cells.splitlines() if "(= base: zero adapter)" in line and line.startswith("| ")]
    assert len(marked) == 1 and marked[0].startswith(f"| {records[0]['label']} **(= base: zero adapter)** |")
    assert "it is the base model without an anchor" in cells
    records[0]["metrics"].pop("same_as_base")
    text = render_sweep_report(records, status, tmp_path, "score", 50).read_text()
    assert "zero adapter" not in text


def test_the_ablation_is_drawn_where_the_controls_ran():
    """A 15-row curve over general budgets with sft-matched at its last point only: the ablation must be there."""
    from tell.sweep_report import main_setting
    records = [record("tell", 8_000, 0.0, size="15 rows", ratio=f"general {b} tok", general_tokens=int(float(b)))
               for b in ("1e4", "1e5", "1e6")]
    assert main_setting(records)["ratio"] == "general 1e4 tok"  # a tie among TELL cells: the first
    records.append(record("sft-matched", 8_000, 0.3, size="15 rows", ratio="general 1e6 tok"))
    assert main_setting(records)["ratio"] == "general 1e6 tok"
    records.append(record("general", 0, 0.0, size="15 rows", ratio="general 1e5 tok"))
    assert main_setting(records)["ratio"] == "general 1e5 tok"  # general-only cells decide first
