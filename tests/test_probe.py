"""Tests of tell.probe on the tiny model: hidden states at the chosen layer, finite separation numbers
(silhouette in [-1, 1]) with and without the anchor, the t-SNE PNG, and layer checks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tell import cli
from tell.probe import separation

FIXTURES = Path(__file__).parent / "fixtures"


def test_separation_of_two_clear_clusters():
    rng = np.random.default_rng(0)
    task, general = rng.normal(0, 1, (20, 8)), rng.normal(10, 1, (20, 8))
    far = separation(task, general)
    assert far["silhouette"] > 0.8 and far["distance_over_spread"] > 5
    mixed = separation(task, rng.normal(0, 1, (20, 8)))
    assert abs(mixed["silhouette"]) < 0.2 and mixed["distance_over_spread"] < 1


def test_probe_writes_tsne_and_finite_numbers(tiny_model_dir, tmp_path, capsys):
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": f"Say the word number {i}.", "response": f"w{i}"}) + "\n"
                            for i in range(8)))
    out = tmp_path / "probe"
    assert cli.main(["probe", "--model", str(tiny_model_dir), "--task", "mine", "--test", str(test), "--metric",
                     "exact", "--general", str(FIXTURES / "general.jsonl"), "--anchor", "Answer with one word.",
                     "--rows", "6", "--out", str(out)]) == 0
    numbers = json.loads((out / "probe.json").read_text())
    assert numbers["layer"] == 1 and numbers["layers"] == 2  # the middle of 2 layers
    assert numbers["task_rows"] == numbers["general_rows"] == 6
    for side in ("without_anchor", "with_anchor"):
        values = numbers[side]
        assert -1.0 <= values["silhouette"] <= 1.0
        assert all(math.isfinite(values[k]) for k in ("centroid_distance", "spread", "distance_over_spread"))
        assert values["distance_over_spread"] == pytest.approx(values["centroid_distance"] / values["spread"])
    assert numbers["without_anchor"] != numbers["with_anchor"]  # the anchor changes what the task rows look like
    assert (out / "probe.png").stat().st_size > 0
    assert cli.main(["probe", "--model", str(tiny_model_dir), "--task", "mine", "--test", str(test), "--metric",
                     "exact", "--general", str(FIXTURES / "general.jsonl"), "--layer", "9", "--rows", "4",
                     "--out", str(tmp_path / "bad")]) == 2
    assert "probe.layer" in capsys.readouterr().err
