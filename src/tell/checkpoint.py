"""Train-stage helper — checkpoints: save and restore everything a LoRA run needs to continue exactly.

In: the PEFT model, optimizer, scheduler, the step reached and the running totals. Out: ``checkpoint/``
inside the run being written (LoRA weights, optimizer and scheduler state, torch RNG states, data
position, CPU thread count, fp16 loss scale). Written to a temporary name and renamed, so a kill mid-save
leaves the previous checkpoint. With several processes rank 0 writes it, holding every rank's RNG states,
and each rank restores its own.

The thread count is part of the state because it is part of the arithmetic: CPU kernels split their sums
across threads, so one step computed with 2 threads and with 1 differs in the last bits (seen on avx2-only
CPUs: a run killed under 2 threads and resumed under 1 drifted from step 6 on). A resumed run therefore
computes with the thread count the run started with.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

CHECKPOINT = "checkpoint"
COMPUTE = "compute.json"  # in the checkpoint folder: {"dtype": "fp32", "device": "cpu"}


def rng_state() -> dict:
    """Return this process's torch RNG states (CPU, and its current CUDA device's)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def gathered_rng_states(world: int) -> list[dict]:
    """Return every rank's RNG states, in rank order (a collective: every rank must call it)."""
    if world <= 1:
        return [rng_state()]
    import torch.distributed as dist
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, step: int, totals: dict, elapsed_s: float,
                    scaler=None, rng_ranks: list[dict] | None = None, compute: dict | None = None) -> None:
    """Write the state after `step` optimizer steps to out_dir/checkpoint (atomically); `compute` (the dtype and
    device type it ran in) goes beside it as compute.json, which a resume elsewhere must match."""
    state = {
        "step": step, "totals": dict(totals), "elapsed_s": elapsed_s,
        "lora": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng_ranks": rng_ranks or [rng_state()],
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "threads": torch.get_num_threads(),
    }
    tmp = out_dir / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    if compute:
        (tmp / COMPUTE).write_text(json.dumps(compute) + "\n", encoding="utf-8")
    final = out_dir / CHECKPOINT
    old = out_dir / (CHECKPOINT + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_compute(out_dir: Path) -> dict | None:
    """Return the dtype and device type the checkpointed run computed in (None: unknown, an older checkpoint)."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        path = Path(out_dir) / name / COMPUTE
        if (Path(out_dir) / name / "state.pt").is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
    return None


def has_checkpoint(out_dir: Path) -> bool:
    out_dir = Path(out_dir)
    return (out_dir / CHECKPOINT / "state.pt").is_file() or (out_dir / (CHECKPOINT + ".old") / "state.pt").is_file()


def load_checkpoint(out_dir: Path, model, optimizer, scheduler, scaler=None, rank: int = 0) -> tuple[int, dict, float]:
    """Restore the saved state into model/optimizer/scheduler (and this rank's RNG); return (step, totals,
    elapsed seconds)."""
    path = out_dir / CHECKPOINT / "state.pt"
    if not path.is_file():  # killed between the two renames: the previous checkpoint is complete
        path = out_dir / (CHECKPOINT + ".old") / "state.pt"
    # On the CPU first: tensors saved from cuda:0 would otherwise all land on cuda:0, whatever the rank.
    state = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["lora"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    ranks = state.get("rng_ranks") or [{"cpu": state["rng_cpu"], "cuda": None}]  # or a checkpoint from before ranks
    rng = ranks[rank] if rank < len(ranks) else ranks[0]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    restore_threads(state.get("threads"))
    return state["step"], state["totals"], state["elapsed_s"]


def restore_threads(threads: int | None) -> None:
    """Compute with the run's own CPU thread count (see the module docstring), saying so when it changes."""
    if threads and threads != torch.get_num_threads():
        import sys
        print(f"[tell] resume: using {threads} CPU threads as the interrupted run did (this process had "
              f"{torch.get_num_threads()}), so the result is bit-identical", file=sys.stderr)
        torch.set_num_threads(threads)


def trim_log(log_path: Path, step: int) -> None:
    """Drop step records after `step` (they are redone after a resume)."""
    if not log_path.is_file():
        return
    lines = [line for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    import json
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def remove_checkpoint(out_dir: Path) -> None:
    for name in (CHECKPOINT, CHECKPOINT + ".old", CHECKPOINT + ".tmp"):
        shutil.rmtree(Path(out_dir) / name, ignore_errors=True)
