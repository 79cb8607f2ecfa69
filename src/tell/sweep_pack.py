"""Experiment helper — a sweep cell's training checkpoint carried in the sweep's own folder.

A cell's training writes its checkpoints into this machine's cache (``$TELL_CACHE/runs/<key>.partial``). While the
cell trains, each new checkpoint is also packed, with the run's config, mix and log, into
``<sweep>/cells/<key>/resume.tar.gz``, and once more when the sweep is stopped (Ctrl-C, SIGTERM). A sweep that
finds such a file, and no copy of that run in its own cache that got as far, unpacks it first, so the cell resumes
on another machine (a copied or committed sweep folder) where it stopped; a finished cell deletes the file.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from tell.checkpoint import has_checkpoint
from tell.data import TellInputError, cache_dir
from tell.sweep_eta import RESUME_FILE, last_logged_step, partial_run

# A step of a long cell takes minutes and a checkpoint comes every few steps: a minute between looks loses little.
PACK_EVERY_S = 60.0
_PACKING = threading.Lock()  # the watcher and the stop handler never write the file at the same time


def _partial_run(cell_dir: Path) -> Path | None:
    try:
        return partial_run(cell_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_stamp(partial: Path | None) -> tuple | None:
    """Return what identifies the run's current checkpoint file (inode, mtime, size), None without one."""
    for name in ("checkpoint", "checkpoint.old"):
        try:
            st = (partial / name / "state.pt").stat()
            return st.st_ino, st.st_mtime_ns, st.st_size
        except (OSError, TypeError):
            continue
    return None


def pack_checkpoint(cell_dir: Path, quiet: bool = False) -> Path | None:
    """Write the cell's training run (its last checkpoint, config, mix and log) to cell_dir/resume.tar.gz and
    return that path; None when the run has no checkpoint (yet, or any more: it finished) or the checkpoint was
    replaced while being packed (the next call packs the new one)."""
    partial = _partial_run(cell_dir)
    with _PACKING:
        stamp = checkpoint_stamp(partial)
        if stamp is None or not has_checkpoint(partial):
            return None
        fd, tmp = tempfile.mkstemp(prefix=RESUME_FILE + ".", suffix=".tmp", dir=cell_dir)
        try:
            with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz", compresslevel=1) as tar:
                # under the run's own name (its key is the same on any machine); never the half-written checkpoint
                tar.add(partial, arcname=partial.name, filter=lambda m: None if m.name.endswith(".tmp") else m)
            if checkpoint_stamp(partial) != stamp:  # a new checkpoint arrived mid-pack: its bytes may be mixed
                return None
            os.replace(tmp, cell_dir / RESUME_FILE)
        finally:
            Path(tmp).unlink(missing_ok=True)
    if not quiet:
        print(f"[tell] sweep: the cell's last checkpoint is in {cell_dir / RESUME_FILE} (the sweep folder resumes "
              "it anywhere)", file=sys.stderr)
    return cell_dir / RESUME_FILE


@contextlib.contextmanager
def packing_checkpoints(cell_dir: Path, every_s: float | None = None, deadline: float | None = None,
                        on_deadline=None):
    """Within the block, pack each new checkpoint of the cell's training (checked every `every_s` seconds), so
    that a sweep killed without warning (kill -9, a machine lost) still leaves one in its folder. Once
    time.monotonic() has passed `deadline`, the first checkpoint packed calls `on_deadline()` and the watch ends."""
    stop, every = threading.Event(), PACK_EVERY_S if every_s is None else every_s

    def watch():
        packed, warned = None, False
        while not stop.wait(every):
            stamp = checkpoint_stamp(_partial_run(cell_dir))
            if stamp is None or stamp == packed:
                continue
            try:
                if pack_checkpoint(cell_dir, quiet=True):
                    packed = stamp
                    if deadline is not None and time.monotonic() >= deadline:
                        on_deadline()
                        return
            except (OSError, tarfile.TarError) as err:
                if not warned:  # e.g. a full disk: say so once, keep training
                    print(f"[tell] sweep: cannot pack the cell's checkpoint into {cell_dir}: {err}", file=sys.stderr)
                    warned = True
    watcher = threading.Thread(target=watch, name="tell-pack-checkpoints", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _packed_run(tar: tarfile.TarFile, packed: Path) -> tuple[str, int]:
    """Return (the packed run's folder name, the last step its log records); raise on anything else."""
    members = tar.getmembers()
    names = {m.name.split("/")[0] for m in members}
    if len(names) != 1 or not (name := names.pop()).endswith(".partial"):
        raise TellInputError(f"not a packed training run (one folder named <key>.partial): {sorted(names)}", packed)
    for m in members:
        if m.name.startswith("/") or ".." in m.name.split("/") or not (m.isfile() or m.isdir()):
            raise TellInputError(f"unsafe entry {m.name!r} in a packed training run", packed)
    log = next((m for m in members if m.name == f"{name}/train_log.jsonl"), None)
    return name, last_logged_step(tar.extractfile(log).read().decode("utf-8")) if log else 0


def restore_checkpoint(cell_dir: Path) -> bool:
    """Unpack cell_dir/resume.tar.gz into this machine's cache unless the cache holds the finished run or an
    interrupted copy of it that got at least as far; return whether it was unpacked. A file that cannot be
    unpacked is set aside (``resume.tar.gz.bad``) with a message, and the cell trains as it would without it."""
    packed = cell_dir / RESUME_FILE
    if not packed.is_file():
        return False
    runs = cache_dir() / "runs"
    try:
        with tarfile.open(packed) as tar:
            name, step = _packed_run(tar, packed)
            local = runs / name
            if (runs / name.removesuffix(".partial")).is_dir() or (
                    has_checkpoint(local) and last_logged_step(_read(local / "train_log.jsonl")) >= step):
                return False
            runs.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=runs))
            try:
                # entries checked above (one folder, plain files, no absolute or .. paths); "data" where it exists
                tar.extractall(staging, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
                shutil.rmtree(local, ignore_errors=True)
                (staging / name).rename(local)  # whole, or not at all
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (OSError, tarfile.TarError, TellInputError, EOFError) as err:
        packed.replace(packed.with_name(RESUME_FILE + ".bad"))
        print(f"[tell] sweep: cannot unpack {packed} ({err}); set aside as {RESUME_FILE}.bad, the cell trains "
              "without it", file=sys.stderr)
        return False
    print(f"[tell] sweep: unpacked the cell's checkpoint (step {step}) from {packed}", file=sys.stderr)
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""
