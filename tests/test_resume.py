"""Crash and resume: a real `tell train` process on the tiny model is killed with SIGKILL after its first
checkpoint; `tell train --resume` must finish with the same adapter and loss sequence as an unbroken run,
bit for bit, in both CPU training dtypes (fp32, and bf16 autocast over a bf16 frozen base)."""
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


# --- a sweep cell killed mid-training -------------------------------------------------------------------

def _sweep_yaml(tmp_path, model_dir) -> Path:
    import yaml
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": f"Say {i}.", "response": f"w{i}"}) + "\n" for i in range(2)))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": str(model_dir), "dtype": "fp32"},
        "data": {"task": str(FIXTURES / "alpaca.jsonl"), "general": str(FIXTURES / "general.jsonl")},
        "eval": {"task": "mine", "test": str(test), "metric": "exact", "limit": 0, "general_rows": 0},
        "train": {"batch_size": 1, "lr": 1e-3, "save_every": 2}, "generate": {"max_new_tokens": 2, "greedy": True},
        "grid": {"method": ["tell"], "task_rows": [3], "ratio": ["max"]}}))
    return path


def test_a_sweep_cell_killed_mid_training_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path, capsys,
                                                                            monkeypatch):
    from tell import sweep_eta
    from tell.sweep_report import status_text
    config = _sweep_yaml(tmp_path, tiny_model_dir)
    monkeypatch.setenv("TELL_CACHE", str(tmp_path / "cache-unbroken"))
    assert cli.main(["sweep", "--config", str(config), "--out", str(tmp_path / "unbroken")]) == 0
    unbroken = next((tmp_path / "cache-unbroken" / "runs").iterdir())

    # The same sweep in a process of its own, SIGKILLed once its cell's training has written a checkpoint.
    cache = tmp_path / "cache-broken"
    proc = subprocess.Popen([sys.executable, "-m", "tell.cli", "sweep", "--config", str(config), "--out",
                             str(tmp_path / "broken")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TELL_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(cache.glob("runs/*.partial/checkpoint/state.pt")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = next(cache.glob("runs/*.partial"), None)
    assert partial is not None and partial.name == unbroken.name + ".partial", "killed before a checkpoint"
    total_steps = len(_losses(unbroken))

    status = sweep_eta.sweep_status(tmp_path / "broken")
    (interrupted,) = status["interrupted_cells"]
    assert 2 <= interrupted["training"]["steps_done"] < total_steps == interrupted["training"]["steps_planned"]
    assert f"training step {interrupted['training']['steps_done']}/{total_steps}" in status_text(status)

    monkeypatch.setenv("TELL_CACHE", str(cache))
    capsys.readouterr()
    assert cli.main(["sweep", "--config", str(config), "--out", str(tmp_path / "broken")]) == 0
    assert "resuming the interrupted training" in capsys.readouterr().err
    resumed = cache / "runs" / unbroken.name
    assert _losses(resumed) == _losses(unbroken)  # bit-identical on CPU
    a = load_file(unbroken / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert sweep_eta.sweep_status(tmp_path / "broken")["done"] == 1


def test_sigterm_stops_a_sweep_as_ctrl_c_does_and_leaves_its_cell_to_any_host(tiny_model_dir, tmp_path, capsys,
                                                                            monkeypatch):
    """SIGTERM (a scheduler's stop, `kill`) mid-training: exit 130 with a one-line message, no traceback, and the
    cell back to pending in the store (not 'running' under this host's name), its last checkpoint packed into the
    cell's folder. The sweep folder moved to another "machine" (an empty cache) resumes the cell from that
    checkpoint and ends with the adapter of an unbroken run."""
    from tell import sweep
    config = _sweep_yaml(tmp_path, tiny_model_dir)
    cache, out = tmp_path / "cache", tmp_path / "sw"
    proc = subprocess.Popen([sys.executable, "-m", "tell.cli", "sweep", "--config", str(config), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TELL_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(cache.glob("runs/*.partial/checkpoint/state.pt")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "tell sweep: stopped" in err and "Traceback" not in err
    conn = sweep.open_store(sweep.db_path(out))
    (row,) = sweep.planned_cells(conn)
    assert (row["status"], row["pid"], row["error"]) == ("pending", None, "interrupted")
    conn.close()
    packed = out / "cells" / row["key"] / sweep.RESUME_FILE
    assert packed.is_file() and "the sweep folder resumes it" in err

    monkeypatch.setenv("TELL_CACHE", str(tmp_path / "cache-unbroken"))
    assert cli.main(["sweep", "--config", str(config), "--out", str(tmp_path / "unbroken")]) == 0
    unbroken = next((tmp_path / "cache-unbroken" / "runs").iterdir())
    moved = tmp_path / "elsewhere" / "sw"
    shutil.copytree(out, moved)
    shutil.rmtree(cache)  # the first machine is gone: --status reads the training step from the packed run
    from tell import sweep_eta
    (interrupted,) = sweep_eta.sweep_status(moved)["interrupted_cells"]
    assert interrupted["training"]["steps_done"] >= 2
    monkeypatch.setenv("TELL_CACHE", str(tmp_path / "cache-elsewhere"))
    capsys.readouterr()
    assert cli.main(["sweep", "--config", str(config), "--out", str(moved)]) == 0
    err = capsys.readouterr().err
    assert "unpacked the cell's checkpoint" in err and "resuming the interrupted training" in err
    resumed = tmp_path / "cache-elsewhere" / "runs" / unbroken.name
    assert len(_losses(resumed)) == len(_losses(unbroken)) and _losses(resumed) == _losses(unbroken)
    a = load_file(unbroken / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not (moved / "cells" / row["key"] / sweep.RESUME_FILE).exists()  # a finished cell keeps no checkpoint


def test_stop_after_ends_a_sitting_at_a_training_checkpoint_and_the_next_goes_on(tiny_model_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    """--stop-after: past the deadline, the first checkpoint packed stops the sweep (exit 0, the cell pending, its
    checkpoint in its folder); the next call resumes it and ends with the adapter of an unbroken run."""
    from tell import sweep, sweep_eta, sweep_pack
    config = _sweep_yaml(tmp_path, tiny_model_dir)
    monkeypatch.setenv("TELL_CACHE", str(tmp_path / "cache-unbroken"))
    assert cli.main(["sweep", "--config", str(config), "--out", str(tmp_path / "unbroken")]) == 0
    unbroken = next((tmp_path / "cache-unbroken" / "runs").iterdir())
    monkeypatch.setenv("TELL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sweep_pack, "PACK_EVERY_S", 0.005)
    out = tmp_path / "sw"
    assert cli.main(["sweep", "--config", str(config), "--out", str(out), "--stop-after", "bad"]) == 2
    assert "sweep.stop_after" in capsys.readouterr().err and not out.exists()  # refused before anything is written
    assert cli.main(["sweep", "--config", str(config), "--out", str(out), "--stop-after", "0s"]) == 0
    assert "--stop-after 0s reached; the cell stopped at its last training checkpoint" in capsys.readouterr().err
    conn = sweep.open_store(sweep.db_path(out))
    (row,) = sweep.planned_cells(conn)
    conn.close()
    assert (row["status"], row["error"]) == ("pending", "interrupted")
    assert (out / "cells" / row["key"] / sweep.RESUME_FILE).is_file()
    (interrupted,) = sweep_eta.sweep_status(out)["interrupted_cells"]
    assert 2 <= interrupted["training"]["steps_done"] < len(_losses(unbroken))
    assert cli.main(["sweep", "--config", str(config), "--out", str(out)]) == 0
    assert "resuming the interrupted training" in capsys.readouterr().err
    resumed = tmp_path / "cache" / "runs" / unbroken.name
    assert _losses(resumed) == _losses(unbroken)
    a = load_file(unbroken / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_an_interrupted_run_with_other_settings_trains_from_scratch(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from tell.config import load_config
    from tell.experiment import prepare_mix
    from tell.resume import partial_differs, resume_or_train
    cfg = load_config(overrides={"data.task": str(FIXTURES / "alpaca.jsonl"), "model.name": str(tiny_model_dir),
                                 "data.general": str(FIXTURES / "general.jsonl"), "mix.ratio": "2",
                                 "train.batch_size": 4, "out": str(tmp_path / "run")})
    import yaml
    from tell.config import config_from_dict
    done = tmp_path / "done"
    assert cli.main(_args(tiny_model_dir, done)) == 0
    same = config_from_dict(yaml.safe_load((done / "config.yaml").read_text()))
    assert partial_differs(same, prepare_mix(same).mix, done) == ""
    same.train.save_every = 7  # changes no step
    assert partial_differs(same, prepare_mix(same).mix, done) == ""
    # a run saved before a setting existed resumes once that setting is registered with its unset value
    saved = yaml.safe_load((done / "config.yaml").read_text())
    unset = saved["train"].pop("micro_batch_tokens")
    (done / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert partial_differs(same, prepare_mix(same).mix, done) == "config (train.micro_batch_tokens)"
    from tell import config as config_module
    monkeypatch.setitem(config_module.RUN_KEY_ADDED_LATER, "train.micro_batch_tokens", unset)
    assert partial_differs(same, prepare_mix(same).mix, done) == ""
    same.train.micro_batch_tokens = 512  # set: the older run did not have it
    assert partial_differs(same, prepare_mix(same).mix, done) == "config (train.micro_batch_tokens)"
    same.train.micro_batch_tokens = unset
    # so does one registered for sweep cell keys only (a data or model setting enters no train key)
    saved["model"].pop("quantize")
    (done / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert partial_differs(same, prepare_mix(same).mix, done) == ""
    same.model.quantize = "4bit"
    assert partial_differs(same, prepare_mix(same).mix, done) == "config (model.quantize)"
    same.model.quantize = "none"
    same.train.lr, same.mix.seed = 5e-4, 3
    assert partial_differs(same, prepare_mix(same).mix, done) == "config (mix.seed, train.lr)"
    # a partial with a checkpoint of another config: started over, and said so
    partial = tmp_path / "run.partial"
    shutil.copytree(done, partial)
    (partial / "checkpoint").mkdir()
    (partial / "checkpoint" / "state.pt").write_bytes(b"not read")
    capsys.readouterr()
    result = resume_or_train(cfg)
    assert "holds an interrupted run with another config" in capsys.readouterr().err
    assert result.optimizer_steps == len(_losses(tmp_path / "run")) and not partial.exists()


def _write_checkpoint(partial: Path, step: int) -> None:
    """A stand-in for a training step's end: its log line, then save_checkpoint's atomic write (tmp folder,
    renames), in train_lora's order."""
    partial.mkdir(parents=True, exist_ok=True)
    with open(partial / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
    tmp = partial / "checkpoint.tmp"
    tmp.mkdir(parents=True)
    (tmp / "state.pt").write_bytes(f"step {step}".encode())
    if (partial / "checkpoint").exists():
        (partial / "checkpoint").rename(partial / "checkpoint.old")
    tmp.rename(partial / "checkpoint")
    shutil.rmtree(partial / "checkpoint.old", ignore_errors=True)


def test_each_new_checkpoint_of_a_training_cell_is_packed_into_its_folder(tmp_path, monkeypatch, capsys):
    """The watcher beside a training cell packs a checkpoint once it appears and again when a newer one replaces
    it, so a sweep killed with SIGKILL still leaves its last checkpoint in the sweep folder; another machine
    unpacks it, and a machine whose own copy is older takes the packed one."""
    import tarfile
    import threading
    from tell import sweep_pack
    monkeypatch.setenv("TELL_CACHE", str(tmp_path / "cache"))
    cell, partial = tmp_path / "sw" / "cells" / "abc", tmp_path / "cache" / "runs" / "k1.partial"
    cell.mkdir(parents=True)
    partial.mkdir(parents=True)
    (cell / "training.json").write_text(json.dumps({"run_dir": str(partial.with_name("k1"))}))
    (partial / "config.yaml").write_text("train: {}\n")

    def packed_state(want: bytes, timeout: float = 10.0) -> bytes | None:
        deadline, data = time.time() + timeout, None
        while time.time() < deadline and data != want:
            try:
                with tarfile.open(cell / "resume.tar.gz") as tar:
                    data = tar.extractfile("k1.partial/checkpoint/state.pt").read()
            except (OSError, KeyError, tarfile.TarError):
                pass
            time.sleep(0.01)
        return data

    polls, stamp = threading.Semaphore(0), sweep_pack.checkpoint_stamp
    monkeypatch.setattr(sweep_pack, "checkpoint_stamp", lambda run: (stamp(run), polls.release())[0])
    with sweep_pack.packing_checkpoints(cell, every_s=0.02):
        assert all(polls.acquire(timeout=10) for _ in range(3))  # the watcher has looked three times
        assert not (cell / "resume.tar.gz").exists()  # no checkpoint yet: nothing to pack
        _write_checkpoint(partial, 2)
        assert packed_state(b"step 2") == b"step 2"
        _write_checkpoint(partial, 4)
        assert packed_state(b"step 4") == b"step 4"
    assert not any(t.name == "tell-pack-checkpoints" for t in threading.enumerate())
    assert not list(cell.glob("*.tmp"))

    packed = (cell / "resume.tar.gz").read_bytes()
    shutil.rmtree(tmp_path / "cache")  # another machine: the cell's folder alone brings the run back
    assert sweep_pack.restore_checkpoint(cell) and "unpacked the cell's checkpoint (step 4)" in capsys.readouterr().err
    assert (partial / "checkpoint" / "state.pt").read_bytes() == b"step 4"
    assert not sweep_pack.restore_checkpoint(cell)  # the cache holds it now: not unpacked again
    shutil.rmtree(partial)  # a machine with an older copy of its own (step 2) takes the packed step 4
    _write_checkpoint(partial, 2)
    assert sweep_pack.restore_checkpoint(cell) and (partial / "checkpoint" / "state.pt").read_bytes() == b"step 4"
    assert not list((tmp_path / "cache" / "runs").glob(".unpack-*"))

    # a damaged file is set aside with a message, and the cell trains without it
    shutil.rmtree(tmp_path / "cache")
    (cell / "resume.tar.gz").write_bytes(packed[: len(packed) // 2])
    assert not sweep_pack.restore_checkpoint(cell)
    assert "set aside as resume.tar.gz.bad" in capsys.readouterr().err
    assert (cell / "resume.tar.gz.bad").is_file() and not (cell / "resume.tar.gz").exists()


def test_a_checkpoint_resumes_only_in_the_dtype_and_on_the_device_type_it_ran(tiny_model_dir, tmp_path, capsys):
    """dtype auto is fp32 on a CPU and bf16 on a GPU: a checkpoint carried to a machine that would continue it
    in another dtype (or on another device type) starts over there, saying why, and `train --resume` refuses."""
    import yaml
    from tell.config import config_from_dict
    from tell.experiment import prepare_mix
    from tell.resume import partial_differs
    broken = tmp_path / "run"
    _kill_after_first_checkpoint(_args(tiny_model_dir, broken), tmp_path / "run.partial")
    partial = tmp_path / "run.partial"
    compute = next(partial.glob("checkpoint*/compute.json"))
    assert json.loads(compute.read_text()) == {"dtype": "fp32", "device": "cpu"}
    cfg = config_from_dict(yaml.safe_load((partial / "config.yaml").read_text()))
    assert partial_differs(cfg, prepare_mix(cfg).mix, partial) == ""
    compute.write_text(json.dumps({"dtype": "bf16", "device": "cuda"}))
    assert partial_differs(cfg, prepare_mix(cfg).mix, partial) == "compute path (it ran bf16 on cuda, here fp32 on cpu)"
    assert cli.main(["train", "--resume", str(broken)]) == 2
    assert "was computed in bf16 on cuda" in capsys.readouterr().err
