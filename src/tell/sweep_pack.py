"""Experiment helper — a sweep cell's training checkpoint carried in the sweep's own folder.

A cell's training writes its checkpoints into this machine's cache (``$TELL_CACHE/runs/<key>.partial``). While the
cell trains, each new checkpoint is also packed, with the run's config, mix and log, into
``<sweep>/cells/<key>/resume.tar.gz``, and once more when the sweep is stopped (Ctrl-C, SIGTERM). A sweep that
finds such a file and no copy of that run in its own cache unpacks it first, so the cell resumes on another
machine (a copied or committed sweep folder) where it stopped; a finished cell deletes the file.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tarfile
import threading
from pathlib import Path

from tell.checkpoint import has_checkpoint
from tell.data import TellInputError, cache_dir
from tell.sweep_eta import PROGRESS, RESUME_FILE

PACK_EVERY_S = 60.0  # how often a training cell's folder is checked for a newer checkpoint to pack


def partial_run(cell_dir: Path) -> Path | None:
    """Return the `.partial` run directory the cell in cell_dir trains into (None if not known)."""
    try:
        run_dir = Path(json.loads((cell_dir / PROGRESS).read_text(encoding="utf-8"))["run_dir"])
    except (OSError, ValueError, KeyError):
        return None
    return run_dir.with_name(run_dir.name + ".partial")


def pack_checkpoint(cell_dir: Path, quiet: bool = False) -> Path | None:
    """Write the cell's training run (its last checkpoint, config, mix and log) to cell_dir/resume.tar.gz and
    return that path; None when the run has no checkpoint (yet, or any more: it finished)."""
    partial = partial_run(cell_dir)
    if partial is None or not has_checkpoint(partial):
        return None
    tmp = cell_dir / (RESUME_FILE + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:  # under the run's own name: its key is the same on any machine
        tar.add(partial, arcname=partial.name, filter=lambda m: None if m.name.endswith("checkpoint.tmp") else m)
    tmp.replace(cell_dir / RESUME_FILE)
    if not quiet:
        print(f"[tell] sweep: the cell's last checkpoint is in {cell_dir / RESUME_FILE} (the sweep folder resumes "
              "it anywhere)", file=sys.stderr)
    return cell_dir / RESUME_FILE


def _checkpoint_stamp(cell_dir: Path) -> int | None:
    partial = partial_run(cell_dir)
    try:
        return (partial / "checkpoint" / "state.pt").stat().st_mtime_ns if partial else None
    except OSError:
        return None


@contextlib.contextmanager
def packing_checkpoints(cell_dir: Path, every_s: float | None = None):
    """Within the block, pack each new checkpoint of the cell's training (checked every `every_s` seconds), so
    that a sweep killed without warning (kill -9, a machine lost) still leaves one in its folder."""
    stop, every = threading.Event(), PACK_EVERY_S if every_s is None else every_s

    def watch():
        packed = None
        while not stop.wait(every):
            stamp = _checkpoint_stamp(cell_dir)
            if stamp is None or stamp == packed:
                continue
            try:
                if pack_checkpoint(cell_dir, quiet=True):
                    packed = stamp
            except (OSError, tarfile.TarError):  # a checkpoint replaced while being read: the next round packs it
                (cell_dir / (RESUME_FILE + ".tmp")).unlink(missing_ok=True)
    watcher = threading.Thread(target=watch, name="tell-pack-checkpoints", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def restore_checkpoint(cell_dir: Path) -> bool:
    """Unpack cell_dir/resume.tar.gz into this machine's cache unless the cache already holds that run or an
    interrupted copy of it (this machine's own is at least as recent); return whether it was unpacked."""
    packed = cell_dir / RESUME_FILE
    if not packed.is_file():
        return False
    runs = cache_dir() / "runs"
    with tarfile.open(packed) as tar:
        names = {m.name.split("/")[0] for m in tar.getmembers()}
        if len(names) != 1 or not (name := names.pop()).endswith(".partial"):
            raise TellInputError(f"not a packed training run (one folder named <key>.partial): {sorted(names)}",
                                 packed)
        if has_checkpoint(runs / name) or (runs / name.removesuffix(".partial")).is_dir():
            return False
        runs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(runs / name, ignore_errors=True)
        tar.extractall(runs, filter="data")
    print(f"[tell] sweep: unpacked the cell's checkpoint from {packed}", file=sys.stderr)
    return True
