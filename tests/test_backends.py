"""The vLLM evaluation backend is optional: without the package, asking for it says so on stderr and the
transformers backend runs instead, with the same metrics; an unknown backend is a config error."""
from __future__ import annotations

import importlib.util
import json

import pytest

from tell import cli


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_falls_back_to_transformers(tiny_model_dir, tmp_path, capsys):
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": f"Say word {i}.", "response": f"w{i}"}) + "\n" for i in range(3)))
    common = ["--model", str(tiny_model_dir), "--task", "mine", "--test", str(test), "--metric", "exact",
              "--greedy", "--max-new-tokens", "6"]
    assert cli.main(["eval", "--backend", "vllm", *common, "--out", str(tmp_path / "v")]) == 0
    err = capsys.readouterr().err
    assert "vllm" in err and "transformers backend instead" in err
    assert cli.main(["eval", *common, "--out", str(tmp_path / "t")]) == 0
    asked, plain = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("v", "t"))
    assert asked["backend"] == plain["backend"] == "transformers"
    drop = {"generate_wall_s", "new_tokens_per_s", "wall_s"}
    assert {k: v for k, v in asked.items() if k not in drop} == {k: v for k, v in plain.items() if k not in drop}
    assert "backend: transformers" in (tmp_path / "v" / "config.yaml").read_text()


def test_unknown_backend_is_rejected(capsys):
    assert cli.main(["eval", "--backend", "tensorrt", "--limit", "2"]) == 2
    assert "generate.backend" in capsys.readouterr().err
