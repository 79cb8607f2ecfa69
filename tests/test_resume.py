"""Crash and resume: a real `tell train` process on the tiny model is killed with SIGKILL after its first
checkpoint; `tell train --resume` must finish with the same adapter and loss sequence as an unbroken run,
bit for bit, in both CPU training dtypes (fp32, and bf16 autocast over a bf16 frozen base)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tell import cli

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.filterwarnings("ignore:training takes only", "ignore:warmup")


def _args(model_dir, out, dtype: str = "fp32") -> list[str]:
    return ["train", "--task", str(FIXTURES / "alpaca.jsonl"), "--general", str(FIXTURES / "general.jsonl"),
            "--model", str(model_dir), "--ratio", "max", "--batch-size", "1", "--lr", "1e-3",
            "--save-every", "2", "--dtype", dtype, "--out", str(out)]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def _kill_after_first_checkpoint(argv: list[str], partial: Path) -> int:
    """Start training in a subprocess, SIGKILL it once a checkpoint exists; return the step it had reached."""
    # One CPU thread, as this test process computes with (conftest): the thread count changes float sums.
    proc = subprocess.Popen([sys.executable, "-m", "tell.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (partial / "checkpoint" / "state.pt").is_file():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return len((partial / "train_log.jsonl").read_text().splitlines())
        time.sleep(0.002)
    proc.kill()
    pytest.fail("training finished (or hung) before a checkpoint could be interrupted")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_after_sigkill_gives_the_same_adapter(tiny_model_dir, tmp_path, capsys, dtype):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    assert cli.main(_args(tiny_model_dir, unbroken, dtype)) == 0
    steps_before_kill = _kill_after_first_checkpoint(_args(tiny_model_dir, broken, dtype),
                                                     tmp_path / "broken.partial")
    assert not broken.exists()  # a killed run never looks finished
    total_steps = len(_losses(unbroken))
    assert steps_before_kill < total_steps
    # The resuming process starts with another thread count than the killed run had (a new shell, another
    # machine): resume must compute with the run's own count, or the sums differ in the last bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    capsys.readouterr()
    try:
        assert cli.main(["train", "--resume", str(broken)]) == 0
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)
    assert f"run written to {broken}: {total_steps} steps" in capsys.readouterr().out
    assert not (tmp_path / "broken.partial").exists() and not (broken / "checkpoint").exists()
    assert _losses(broken) == _losses(unbroken)  # bit-identical on CPU
    a = load_file(unbroken / "adapter" / "adapter_model.safetensors")
    b = load_file(broken / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_same_config_gives_the_same_loss_sequence(tiny_model_dir, tmp_path):
    args = _args(tiny_model_dir, tmp_path / "a")
    args[args.index("--save-every") + 1] = "0"
    assert cli.main(args) == 0
    args[-1] = str(tmp_path / "b")
    assert cli.main(args) == 0
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert (tmp_path / "a" / "mix.jsonl").read_bytes() == (tmp_path / "b" / "mix.jsonl").read_bytes()
