"""The vLLM evaluation backend is optional: without the package, asking for it is one clear error (exit 2),
raised before any model is loaded; the default transformers backend is unaffected."""
from __future__ import annotations

import importlib.util

import pytest

from tell import cli


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    code = cli.main(["eval", "--backend", "vllm", "--model", str(tiny_model_dir), "--task", "halu-cot-json",
                     "--limit", "2", "--out", str(tmp_path / "e")])
    assert code == 2
    err = capsys.readouterr().err
    assert "vllm" in err and "transformers" in err
    assert not (tmp_path / "e").exists()


def test_unknown_backend_is_rejected(capsys):
    assert cli.main(["eval", "--backend", "tensorrt", "--limit", "2"]) == 2
    assert "generate.backend" in capsys.readouterr().err
