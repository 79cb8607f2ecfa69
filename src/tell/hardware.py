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


def usable_cores(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """Return the logical cores this process may use: its taskset or cpuset, capped by a CPU quota of its cgroup
    or any cgroup above it (containers often get 2 CPUs of quota on a many-core host; more threads than that
    only contend), where logical_cores counts the host's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quotas = [q for q in map(_cpu_quota, _cgroup_dirs(cgroup_root, proc_cgroup)) if q]
    return max(1, min([cores, *quotas]))


def _cgroup_dirs(root: str, proc_cgroup: str) -> list[str]:
    """Return this process's cgroup folder and those above it up to the mount root (v2 `0::/path`, v1 the
    `cpu` controller's path under root/cpu or root/cpu,cpuacct); the mount roots alone where /proc/self/cgroup
    says nothing usable or names a folder outside this namespace (`..`)."""
    found = {}  # "v1": the cpu controller's path, "v2": the unified hierarchy's
    try:
        with open(proc_cgroup, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:  # a malformed line says nothing; the others still count
            continue
        if "cpu" in fields[1].split(","):
            found["v1"] = fields[2]
        elif fields[1] == "":
            found["v2"] = fields[2]
    v1_mounts = [os.path.join(root, n) for n in ("cpu", "cpu,cpuacct", "cpuacct,cpu")
                 if os.path.isdir(os.path.join(root, n))]
    if "v1" in found and v1_mounts:
        path, base = found["v1"], v1_mounts[0]
    elif "v2" in found:
        path, base = found["v2"], root
    else:
        return [root, *v1_mounts]
    parts = [p for p in path.split("/") if p]
    if ".." in parts:  # the process sits outside this cgroup namespace's view: only the mount root is known
        parts = []
    dirs = [os.path.join(base, *parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if os.path.isdir(d)] or [root]


def _cpu_quota(folder: str) -> int | None:
    """Return a cgroup folder's CPU quota rounded up to whole cores (v2 cpu.max, v1 cfs_quota_us), or None."""
    try:
        with open(os.path.join(folder, "cpu.max"), encoding="utf-8") as f:
            fields = f.read().split()
    except OSError:
        try:
            with open(os.path.join(folder, "cpu.cfs_quota_us"), encoding="utf-8") as f:
                quota = f.read().strip()
            with open(os.path.join(folder, "cpu.cfs_period_us"), encoding="utf-8") as f:
                fields = [quota, f.read().strip()]
        except OSError:
            return None
    try:
        quota_us, period_us = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100_000
    except (ValueError, IndexError):  # "max" (no quota) or an empty file
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
    container's CPU quota, and threads beyond the quota only wait on each other. A thread count the user set
    (OMP_NUM_THREADS) is kept."""
    cores = usable_cores()
    if not os.environ.get("OMP_NUM_THREADS") and cores < torch.get_num_threads():
        torch.set_num_threads(cores)
