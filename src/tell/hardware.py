"""What machine a run computes on: the CPU kind, threads and dtype names that every run records.

Used by train and generate to say, in a run's outputs, which path ran (its dtype, kernels and the CPU kind
they were chosen for), so a figure or a metric can always be traced to the hardware that produced it.
There are two CPU kinds: with native bf16 (avx512_bf16 or amx_bf16, bf16 matmuls fast) and without (avx2
only: bf16 is emulated, ~100x slower than fp32, and fp32 is the fast path).
"""
from __future__ import annotations

import math
import os
import platform
from functools import lru_cache

import torch

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@lru_cache(maxsize=1)
def cpu_kind() -> dict:
    """Return this CPU's model name, logical cores (the host's, and those this process may use), which of
    CPU_FLAGS it has and whether bf16 is native."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
    except OSError:
        info = ""
    lines = info.splitlines()
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "?")
    return {"model_name": name, "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
            "flags": [f for f in CPU_FLAGS if f in flags], "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"})}


def usable_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Return the logical cores this process may use: its taskset or cpuset, capped by a cgroup CPU quota
    (containers often get 2 CPUs of quota on a many-core host; more threads than that only contend), where
    logical_cores counts the host's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, quota)) if quota else cores


def _cgroup_cpu_quota(root: str) -> int | None:
    """Return the cgroup's CPU quota rounded up to whole cores (v2 cpu.max, else v1 cfs_quota_us), or None."""
    try:
        with open(os.path.join(root, "cpu.max"), encoding="utf-8") as f:
            quota, period = (f.read().split() + ["100000"])[:2]
    except OSError:
        try:
            with open(os.path.join(root, "cpu", "cpu.cfs_quota_us"), encoding="utf-8") as f:
                quota = f.read().strip()
            with open(os.path.join(root, "cpu", "cpu.cfs_period_us"), encoding="utf-8") as f:
                period = f.read().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return math.ceil(quota_us / period_us) if quota_us > 0 and period_us > 0 else None


def cpu_label() -> str:
    """Return the CPU kind in a few words, e.g. 'avx2-only (no native bf16)'."""
    kind = cpu_kind()
    if kind["native_bf16"]:
        return "avx512_bf16 (native bf16)" if "avx512_bf16" in kind["flags"] else "amx_bf16 (native bf16)"
    if "avx512f" in kind["flags"]:
        return "avx512 without bf16"
    return "avx2-only (no native bf16)" if "avx2" in kind["flags"] else "no avx2"


def machine(device: torch.device | str = "cpu") -> dict:
    """Return the device, its kind and the thread count a computation runs with (recorded beside metrics)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"device": str(device), "gpu": torch.cuda.get_device_name(device),
                "cuda": str(torch.version.cuda), "torch": str(torch.__version__)}
    return {"device": "cpu", "cpu": cpu_kind()["model_name"], "cpu_kind": cpu_label(),
            "cpu_flags": cpu_kind()["flags"], "threads": torch.get_num_threads(), "torch": str(torch.__version__)}


def dtype_name(dtype: torch.dtype | None) -> str:
    """Return 'bf16', 'fp16' or 'fp32' (None, no autocast, computes in fp32)."""
    return DTYPE_NAMES.get(dtype or torch.float32, str(dtype))


def cap_threads_to_usable_cores() -> None:
    """Compute with no more threads than usable_cores: torch counts the cores of the host or cpuset, not a
    container's CPU quota, and threads beyond the quota only wait on each other."""
    cores = usable_cores()
    if cores < torch.get_num_threads():
        torch.set_num_threads(cores)
