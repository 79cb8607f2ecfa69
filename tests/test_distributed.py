"""Multi-process training: two CPU processes (torchrun, gloo) runs `tell train` with the same
global batch as one process. With LoRA dropout off, the two runs differ only in the order gradients are
summed, so the loss curves and adapters agree to float tolerance (stated below). A two-process run killed
with SIGKILL resumes on two processes to the same adapter as an unbroken two-process run (only rank 0 writes;
each rank gets its own RNG state back). The other verbs refuse several processes."""
from __future__ import annotations

import json
import os
import shutil
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
LOSS_TOLERANCE = 1e-4  # relative; bf16 matmuls summed in another order across ranks
pytestmark = pytest.mark.filterwarnings("ignore:training takes only", "ignore:warmup")


def _args(model_dir, out) -> list[str]:
    return ["train", "--task", str(FIXTURES / "alpaca.jsonl"), "--general", str(FIXTURES / "general.jsonl"),
            "--model", str(model_dir), "--ratio", "max", "--batch-size", "4", "--lr", "1e-3",
            "--train.lora_dropout", "0", "--dtype", "fp32", "--save-every", "0", "--out", str(out)]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


LAUNCHER = str(Path(sys.executable).parent / "accelerate")
needs_launcher = pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                                    reason="accelerate's launcher is not installed")


def _launch(argv: list[str], monitor_interval: float = 0.1) -> list[str]:
    """Return the command that runs `tell argv` on two CPU processes (one thread each). torchrun, not
    `accelerate launch --cpu --num_processes 2`: accelerate 1.15 runs that as ONE process (its simple
    launcher, WORLD_SIZE unset); tell joins the group through accelerate's PartialState either way.
    `monitor_interval` is how often torchrun polls its workers: once one fails, it kills the others at the
    next poll."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            "--monitor-interval", str(monitor_interval), "-m", "tell.cli", *argv]


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@needs_launcher
def test_two_processes_match_one(tiny_model_dir, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    assert cli.main(_args(tiny_model_dir, single)) == 0
    done = subprocess.run(_launch(_args(tiny_model_dir, double)), env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((double / "train_summary.json").read_text())["processes"] == 2  # really two ranks
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


def _resume_args(model_dir, out) -> list[str]:
    # LoRA dropout on (0.05): each rank draws its own masks, so a resumed rank needs its own RNG state back
    return ["train", "--task", str(FIXTURES / "alpaca.jsonl"), "--general", str(FIXTURES / "general.jsonl"),
            "--model", str(model_dir), "--ratio", "max", "--batch-size", "2", "--lr", "1e-3", "--dtype", "fp32",
            "--save-every", "3", "--out", str(out)]


@needs_launcher
def test_two_process_run_killed_and_resumed_equals_an_unbroken_one(tiny_model_dir, tmp_path):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    done = subprocess.run(_launch(_resume_args(tiny_model_dir, unbroken)), env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    partial = tmp_path / "broken.partial"
    proc = subprocess.Popen(_launch(_resume_args(tiny_model_dir, broken)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (partial / "checkpoint" / "state.pt").is_file():
        time.sleep(0.002)
    assert proc.poll() is None, "training ended before a checkpoint could be interrupted"
    import psutil
    ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts each rank in its own session
    for rank in ranks:
        rank.kill()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)
    steps_before_kill = len((partial / "train_log.jsonl").read_text().splitlines())
    assert not broken.exists() and steps_before_kill < len(_losses(unbroken))
    done = subprocess.run(_launch(["train", "--resume", str(broken)]), env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not partial.exists() and not (broken / "checkpoint").exists()
    steps = [json.loads(line)["step"] for line in (broken / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step logged twice
    assert _losses(broken) == _losses(unbroken)
    wa = load_file(unbroken / "adapter" / "adapter_model.safetensors")
    wb = load_file(broken / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("verb", [["compare", "--quick"], ["eval", "--limit", "2"], ["mix", "--task", "x.jsonl"],
                                  ["generate", "--prompts", "p.jsonl"], ["sweep", "--config", "s.yaml"]])
def test_other_verbs_refuse_several_processes(verb, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main([*verb, "--out", str(tmp_path / "out")]) == 2
    assert "runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_launcher
def test_compare_on_two_processes_stops_both_with_the_message(tiny_model_dir, tmp_path):
    out = tmp_path / "compare"
    # torchrun kills the slower rank at its first poll after the faster one fails; polling every 20 s gives
    # both ranks time to reach the check (about 3 s each, under load more) so each must print the message.
    argv = ["compare", "--quick", "--model", str(tiny_model_dir), "--out", str(out)]
    done = subprocess.run(_launch(argv, monitor_interval=20), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert done.stderr.count("tell compare runs in one process") == 2
    assert not out.exists() and not out.with_name("compare.partial").exists()
