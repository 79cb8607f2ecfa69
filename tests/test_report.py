"""Tests of tell.report on hand-made compare results (no model): the diagnostics table, arms below the majority
baseline marked in the tables and hatched in the chart."""
from __future__ import annotations

from tell import report

DIAGNOSTICS = {"majority_baseline": 0.854, "distinct_output_fraction": 0.5, "anchor_copy_rate": 0.0}


def arm(accuracy: float, **extra) -> dict:
    return {"n": 48, "json_adherence_lenient": 0.8, "label_accuracy": accuracy, "ci95": {}, **DIAGNOSTICS,
            "predicted_label_counts": {"yes": 37, "no": 0, "Yes": 2, "none": 9}, **extra}


def test_arms_below_the_majority_baseline_are_marked(tmp_path, monkeypatch):
    results = {"base": arm(0.9), "tell": arm(0.104, target_copy_rate=0.979)}
    assert report.below_majority(results["tell"]) and not report.below_majority(results["base"])
    assert not report.below_majority({"chrf": 40.0, "distinct_output_fraction": 1.0})  # label-free
    table = report.compare_table(results)
    assert "| tell | 80.0% | 10.4% **< majority 85.4%** |" in table and "| base | 80.0% | 90.0% |" in table
    diagnostics = report.diagnostics_table(results)
    assert "| tell | 10.4% | 85.4% | **yes** | yes 37 / no 0 / Yes 2 / none 9 | 50.0% | 0.0% | 97.9% |" in diagnostics
    assert "| base | 90.0% | 85.4% | no |" in diagnostics and diagnostics.splitlines()[2].endswith("| – |")
    assert report.diagnostics_table({"a": {"chrf": 1.0}}) == ""
    hatched = []
    real = report._mark_majority

    def spy(ax, arm_metrics, bars):
        real(ax, arm_metrics, bars)
        hatched.extend(bar.get_hatch() for bar in bars)
    monkeypatch.setattr(report, "_mark_majority", spy)
    summary = {"task": "halu-cot-json", "task_rows": 16, "ratio": "10", "test_rows": 48, "anchor": "a",
               "quick": False, "stage_wall_s": {}, "wall_s": 1.0}
    report.write_compare_report(results, summary, tmp_path)
    assert hatched == [None, "//"]
    text = (tmp_path / "report.md").read_text()
    assert "## Judging or copying?" in text and (tmp_path / "compare.png").stat().st_size > 0
