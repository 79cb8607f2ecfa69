"""Multi-process training: `accelerate launch --num_processes 2` (CPU, gloo) runs `tell train` with the same
global batch as one process. With LoRA dropout off, the two runs differ only in the order gradients are
summed, so the loss curves and adapters agree to float tolerance (stated below)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tell import cli

FIXTURES = Path(__file__).parent / "fixtures"
LOSS_TOLERANCE = 1e-4  # relative; bf16 matmuls summed in another order across ranks
pytestmark = pytest.mark.filterwarnings("ignore:training takes only", "ignore:warmup")


def _args(model_dir, out) -> list[str]:
    return ["train", "--task", str(FIXTURES / "alpaca.jsonl"), "--general", str(FIXTURES / "general.jsonl"),
            "--model", str(model_dir), "--ratio", "max", "--batch-size", "4", "--lr", "1e-3",
            "--train.lora_dropout", "0", "--dtype", "fp32", "--save-every", "0", "--out", str(out)]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="accelerate's launcher is not installed")
def test_two_processes_match_one(tiny_model_dir, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    assert cli.main(_args(tiny_model_dir, single)) == 0
    launcher = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([launcher, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tell.cli",
                           *_args(tiny_model_dir, double)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _losses(single), _losses(double)
    assert len(a) == len(b) > 5
    assert all(abs(x - y) <= LOSS_TOLERANCE * abs(x) for x, y in zip(a, b)), (a, b)
    wa = load_file(single / "adapter" / "adapter_model.safetensors")
    wb = load_file(double / "adapter" / "adapter_model.safetensors")
    assert all((wa[k] - wb[k]).abs().max() <= 1e-4 for k in wa)
    assert json.loads((double / "train_summary.json").read_text())["trained_tokens"] == \
        json.loads((single / "train_summary.json").read_text())["trained_tokens"]


def test_sharding_configs_are_recognised_so_the_run_can_warn(monkeypatch):
    """An accelerate FSDP or DeepSpeed config is detected (the loop replicates the base, and says so)."""
    from tell.train import sharding_asked
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert sharding_asked() == ""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharding_asked() == "FSDP"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert sharding_asked() == "DeepSpeed"
