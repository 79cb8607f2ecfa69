"""Experiment: `tell sweep` — a grid of single-arm compare cells, each run once, results in SQLite.

In: a sweep YAML — any RunConfig section as the base settings, plus ``grid:``, a mapping of axis → list of
values (its cartesian product), or a list of such mappings (the union of their products). Out, in the
sweep's ``out`` directory: ``sweep.sqlite`` (one row per cell, keyed by a hash of the cell's resolved
config), ``cells/<key>/`` (metrics, generations, run summary) and the report (``tell report DIR``).
A finished cell is never run again; a killed sweep resumes and loses at most the cell it was running. A sweep
stopped mid-training also leaves that cell's last checkpoint packed in ``cells/<key>/resume.tar.gz``
(sweep_pack.py), so the sweep directory alone (copied, or committed) resumes the cell on another machine.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import shutil
import signal
import sys
import tarfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tell.config import (ARMS, AnchorConfig, RunConfig, added_later, config_dict, config_from_dict, drop_unset,
                         duration_seconds, validate)
from tell.config_keys import apply_overrides, flat_fields, load_yaml_overrides
from tell.data import TellInputError
from tell.sweep_eta import PROGRESS, RESUME_FILE, sweep_status
from tell.sweep_pack import pack_checkpoint, packing_checkpoints, restore_checkpoint
from tell.sweep_store import (claim, db_path, fail, finish, open_store, planned_cells, recover_stale, register,
                              release_running, running_elsewhere)

# Short axis names → the config keys each sets; any dotted config key is an axis too.
AXES = {
    "method": ("compare.arms",), "task_rows": ("compare.task_rows",), "task_tokens": ("compare.task_tokens",),
    "ratio": ("mix.ratio",), "general_tokens": ("mix.general_tokens",), "anchor": ("anchor.mode",),
    "placement": ("anchor.placement",),
    "order": ("mix.order",), "lr": ("train.lr",), "seed": ("mix.seed", "train.seed", "generate.seed"),
    "select": ("data.select",),
}
# Settings that never change a cell's result, so they stay out of its key.
NOT_IN_KEY = ("out", "compare.cache", "train.report_to", "train.save_every")
CELL_FILES = ("metrics.json", "generations.jsonl", "config.yaml", "anchor.txt", "manifest.json",
              "train_summary.json", "train_log.jsonl", "loss_curve.png")


@dataclass(frozen=True)
class Cell:
    key: str
    label: str
    cfg: RunConfig


# --- grid ------------------------------------------------------------------------------------------

def _flatten(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_sweep(path: str | Path, overrides: dict | None = None) -> tuple[RunConfig, list[dict[str, list]]]:
    """Return the base config (defaults < YAML < overrides) and the grids (axis → values) of a sweep file."""
    values, lines = load_yaml_overrides(path)
    grids = [_flatten(g) for g in values.pop("grid")] if isinstance(values.get("grid"), list) else \
        [{k[5:]: v for k, v in values.items() if k.startswith("grid.")}]
    rest = {k: v for k, v in values.items() if not k.startswith("grid.") and k != "grid"}
    base = apply_overrides(RunConfig(), rest, str(path), lines)
    apply_overrides(base, overrides or {}, "command line")
    validate(base)
    known = set(AXES) | set(flat_fields(base))
    for grid in grids:
        for axis in grid:
            if axis not in known:
                import difflib
                close = difflib.get_close_matches(axis, sorted(known), n=1)
                raise TellInputError(f"unknown grid axis '{axis}'" + (f"; did you mean '{close[0]}'?" if close
                                     else f"; axes: {', '.join(sorted(AXES))} or any config key"),
                                     path, lines.get(f"grid.{axis}"))
    return base, [{k: v if isinstance(v, list) else [v] for k, v in g.items()} for g in grids if g]


def normalise(cfg: RunConfig) -> RunConfig:
    """Return the cell config with settings its arm ignores reset to defaults, so equal cells share a key."""
    defaults, arm, anchor = RunConfig(), cfg.compare.arms, cfg.anchor
    if arm in ("base", "base-anchor"):  # untrained: no training setting plays a part
        cfg.train = defaults.train
    if arm == "base":  # nor the task rows or the mix (base-anchor keeps them: a self-instruct anchor reads rows)
        cfg.mix = defaults.mix
        cfg.compare.task_rows, cfg.compare.task_tokens = defaults.compare.task_rows, defaults.compare.task_tokens
    if arm == "sft":  # no general rows (sft-matched keeps them and the anchor: TELL's step count depends on them)
        cfg.mix.ratio, cfg.mix.order, cfg.mix.allow_repeat = defaults.mix.ratio, defaults.mix.order, False
        cfg.mix.general_tokens = 0
    if cfg.mix.general_tokens:  # an absolute general-token budget: the ratio plays no part
        cfg.mix.ratio = defaults.mix.ratio
    if arm in ("base", "sft"):  # no anchor reaches these arms
        cfg.anchor = defaults.anchor
    elif anchor.mode == "none":
        cfg.anchor = AnchorConfig(mode="none", placement=anchor.placement)
    elif anchor.mode == "manual":
        cfg.anchor = AnchorConfig(text=anchor.text, file=anchor.file, placement=anchor.placement)
    else:  # self-instruct: the model writes the text, so a text in the base settings must not leak in
        cfg.anchor = AnchorConfig(mode="self-instruct", placement=anchor.placement,
                                  self_instruct_rows=anchor.self_instruct_rows, meta_prompt=anchor.meta_prompt,
                                  self_instruct_max_new_tokens=anchor.self_instruct_max_new_tokens,
                                  self_instruct_tries=anchor.self_instruct_tries)
    if cfg.generate.greedy:
        cfg.generate.seed = defaults.generate.seed  # greedy decoding draws nothing
    if arm == "base" or not cfg.data.select:  # no rows chosen: the selection settings play no part
        cfg.data.select, cfg.data.select_pool, cfg.select = "", "", defaults.select
    return cfg


def cell_key(cfg: RunConfig) -> str:
    """Return the 16-hex-digit hash of a cell's resolved config (settings that change no result left out)."""
    values = {k: v for k, v in config_dict(cfg).items() if k not in ("sweep", "probe")}
    if not cfg.data.select:  # cells without a selection keep the keys they had before selection existed
        values.pop("select", None)
        values["data"] = {k: v for k, v in values["data"].items() if k not in ("select", "select_pool")}
    for dotted in NOT_IN_KEY:
        section, _, name = dotted.partition(".")
        (values.get(section, {}).pop(name, None) if name else values.pop(section, None))
    drop_unset(values, added_later())
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def cell_label(cfg: RunConfig) -> str:
    """Return a short human name of a cell: its arm and the settings a sweep usually varies."""
    size = f"{cfg.compare.task_tokens} task tok" if cfg.compare.task_tokens else f"{cfg.compare.task_rows} rows"
    parts = [cfg.compare.arms]
    if cfg.compare.arms not in ("base", "base-anchor"):
        parts += [size, f"lr {cfg.train.lr:g}", f"seed {cfg.train.seed}"]
    if cfg.compare.arms in ("tell", "general", "sft-matched"):
        parts += [general_budget(cfg), f"order {cfg.mix.order}"]
    if cfg.compare.arms not in ("base", "sft"):
        parts.append(f"anchor {cfg.anchor.mode}/{cfg.anchor.placement}")
    if cfg.data.select:
        parts.append(f"select {cfg.data.select} seed {cfg.select.seed}")
    return ", ".join(parts)


def general_budget(cfg: RunConfig) -> str:
    """Return the general rows' budget as set: 'ratio 10' or 'general 3e5 tok' (mix.general_tokens)."""
    if not cfg.mix.general_tokens:
        return f"ratio {cfg.mix.ratio}"
    exponent = len(str(cfg.mix.general_tokens)) - 1
    return f"general {cfg.mix.general_tokens / 10 ** exponent:g}e{exponent} tok"


def expand_grid(base: RunConfig, grids: list[dict[str, list]]) -> list[Cell]:
    """Return the distinct cells of the grids' products, in order (each cell one arm of compare)."""
    cells, seen = [], set()
    for grid in grids or [{}]:
        grid = dict(grid)
        if "method" not in grid and "compare.arms" not in grid:
            grid["method"] = [a.strip() for a in base.compare.arms.split(",") if a.strip()]
        for combination in itertools.product(*grid.values()):
            cfg = copy.deepcopy(base)
            overrides = {}
            for axis, value in zip(grid, combination):
                overrides.update({key: value for key in AXES.get(axis, (axis,))})
            where = "sweep grid cell " + ", ".join(f"{a}={v}" for a, v in zip(grid, combination))
            apply_overrides(cfg, overrides, where)
            if cfg.compare.arms not in ARMS:
                raise TellInputError(f"{where}: method {cfg.compare.arms!r} is not one of {list(ARMS)}")
            try:
                validate(cfg)
            except TellInputError as err:
                raise TellInputError(f"{where}: {err}") from None
            cfg = normalise(cfg)
            cfg.sweep.max_cells, cfg.sweep.stop_after = 0, ""  # how long one invocation runs is no cell's part
            key = cell_key(cfg)
            if key not in seen:
                seen.add(key)
                cells.append(Cell(key, cell_label(cfg), cfg))
    return cells


# --- running ---------------------------------------------------------------------------------------

def plan_sweep(config_path: str | Path, overrides: dict | None = None) -> tuple[RunConfig, Path]:
    """Return (base config, sweep directory) after registering the sweep's cells in its database."""
    base, grids = load_sweep(config_path, overrides)
    out = Path(base.out or "runs/sweep")
    conn = open_store(db_path(out))
    register(conn, expand_grid(base, grids), report_settings(base))
    conn.close()
    return base, out


def report_settings(base: RunConfig) -> dict:
    """Return the sweep settings the store keeps for the report: those of this invocation alone (how many cells,
    how long) at their defaults, so any call (`--max-cells 1`, `--stop-after 2h`, `--status`) stores the same."""
    settings = config_dict(base.sweep)
    settings.pop("stop_after")
    return {**settings, "max_cells": 0}


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's or `docker stop`'s, `kill`'s default) stops the sweep as Ctrl-C does: the cell
    goes back to pending in the store, so any host can take it up, instead of staying 'running'."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep(config_path: str | Path, overrides: dict | None = None, write_report: bool = True,
              release: bool = False) -> dict:
    """Run every cell of the sweep that is not done yet; return the status after the run. `release` first
    gives back the cells another host left 'running' (see `sweep_store.release_running`)."""
    from tell.compare import run_cell
    base, out = plan_sweep(config_path, overrides)
    deadline = _deadline(base.sweep.stop_after)
    reached = threading.Event()

    def stop_here():  # the watcher thread, at a checkpoint after the deadline: stop as SIGTERM does
        reached.set()
        os.kill(os.getpid(), signal.SIGTERM)
    conn = open_store(db_path(out))
    if release and (released := release_running(conn)):
        print(f"[tell] sweep: {released} cell(s) marked running were released and will run here", file=sys.stderr)
    if recovered := recover_stale(conn):
        print(f"[tell] sweep: {recovered} cell(s) left running by a killed sweep will run again", file=sys.stderr)
    ran = 0
    from tell.model import shared_base
    with shared_base(), _sigterm_as_interrupt():  # one base model for all cells of this call
        for row in planned_cells(conn):
            if base.sweep.max_cells and ran >= base.sweep.max_cells:
                break
            if deadline is not None and ran and time.monotonic() >= deadline and row["status"] != "done":
                print(f"[tell] sweep: --stop-after {base.sweep.stop_after} reached; no new cell starts",
                      file=sys.stderr)
                break  # (the first cell always starts: every sitting moves the sweep on)
            if row["status"] in ("done", "running") or not claim(conn, row["key"]):
                continue
            ran += 1
            print(f"[tell] sweep cell {row['key']}: {row['label']}", file=sys.stderr, flush=True)
            start, cell_dir = time.perf_counter(), out / "cells" / row["key"]
            try:
                restore_checkpoint(cell_dir)
                with packing_checkpoints(cell_dir, deadline=deadline, on_deadline=stop_here):
                    result = run_cell(config_from_dict(json.loads(row["config"])), cell_dir / PROGRESS)
            except KeyboardInterrupt:
                _pack_on_stop(cell_dir)  # before the cell is pending: no other host may take it up half-packed
                fail(conn, row["key"], "interrupted", status="pending")
                if not reached.is_set():
                    raise
                print(f"[tell] sweep: --stop-after {base.sweep.stop_after} reached; the cell stopped at its last "
                      "training checkpoint and resumes from it next time", file=sys.stderr)
                break
            except Exception as err:  # noqa: BLE001 - one broken cell must not stop the sweep; its error is kept
                fail(conn, row["key"], f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}")
                print(f"[tell] sweep cell {row['key']} failed: {err}", file=sys.stderr)
                continue
            finish(conn, row["key"], _stored_result(result, out / "cells" / row["key"]), time.perf_counter() - start)
    _say_running_elsewhere(conn, config_path)
    conn.close()
    if write_report:
        write_sweep_report(out)
    return {**sweep_status(out), "out": str(out)}


def _deadline(stop_after: str) -> float | None:
    """Return the time.monotonic() at which this invocation stops (sweep.stop_after from now), None for none."""
    return time.monotonic() + duration_seconds(stop_after) if stop_after else None


def _pack_on_stop(cell_dir: Path) -> None:
    try:
        pack_checkpoint(cell_dir)
    except (OSError, tarfile.TarError) as err:  # the stop goes on; this machine's cache still has the checkpoint
        print(f"[tell] sweep: could not pack the cell's checkpoint: {err}", file=sys.stderr)


def _say_running_elsewhere(conn, config_path) -> None:
    """Name the cells left to another host's sweep, and how to take them over if that sweep is gone."""
    if not (rows := running_elsewhere(conn)):
        return
    cells = "; ".join(f"{r['key']} ({r['label']}) on {r['host']}, pid {r['pid']}" for r in rows)
    print(f"[tell] sweep: left to the sweep that claimed them: {cells}. If none runs there any more (a copied "
          f"folder, a renamed machine), `tell sweep --config {config_path} --release-running` runs them here.",
          file=sys.stderr)


def _stored_result(result: dict, cell_dir: Path) -> dict:
    """Return the cell result as stored (with per-row scores) after copying its small files to cell_dir."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / PROGRESS).unlink(missing_ok=True)
    (cell_dir / RESUME_FILE).unlink(missing_ok=True)
    for folder in (result["run_dir"], result["eval_dir"]):
        for name in CELL_FILES:
            if folder and (Path(folder) / name).is_file():
                shutil.copy2(Path(folder) / name, cell_dir / name)
    if result.get("selection"):
        (cell_dir / "selection.json").write_text(json.dumps(result["selection"], indent=1) + "\n", encoding="utf-8")
    with open(Path(result["eval_dir"]) / "generations.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {**result, "row_ids": [r["id"] for r in records], "row_scores": [r["score"] for r in records]}


# --- report ----------------------------------------------------------------------------------------

def result_rows(out: str | Path) -> list[dict]:
    """Return one flat record per finished cell of the sweep in `out` (what the report functions read)."""
    conn = open_store(db_path(out))
    rows = [r for r in planned_cells(conn) if r["status"] == "done"]
    conn.close()
    records = []
    for row in rows:
        cfg, result = config_from_dict(json.loads(row["config"])), json.loads(row["result"])
        metrics = result["metrics"]
        records.append({
            "key": row["key"], "label": row["label"], "method": cfg.compare.arms,
            "size": f"{cfg.compare.task_tokens} tokens" if cfg.compare.task_tokens else f"{cfg.compare.task_rows} rows",
            "task_rows": result.get("task_rows", 0), "task_tokens": metrics.get("task_tokens", 0),
            "general_tokens": metrics.get("general_tokens", 0),
            "ratio": general_budget(cfg) if cfg.mix.general_tokens else str(cfg.mix.ratio),  # the budget setting
            "anchor": cfg.anchor.mode if cfg.compare.arms not in ("base", "sft") else "none",
            "placement": cfg.anchor.placement, "order": cfg.mix.order, "lr": cfg.train.lr, "seed": cfg.train.seed,
            "select": cfg.data.select or "seeded draw",
            "task": cfg.eval.task, "metrics": metrics, "row_ids": result["row_ids"],
            "row_scores": result["row_scores"], "anchor_text": result.get("anchor", ""), "wall_s": row["wall_s"],
        })
    return records


def write_sweep_report(out: str | Path, metric: str | None = None) -> Path:
    """Write report.md, report.html and the plots of the sweep in `out` (with another `metric` than the
    sweep's: in out/by-<metric>/); return report.md's path."""
    from tell.sweep_report import render_sweep_report
    conn = open_store(db_path(out))
    stored = conn.execute("SELECT value FROM meta WHERE name = 'sweep'").fetchone()
    conn.close()
    settings = {**config_dict(RunConfig().sweep), **(json.loads(stored["value"]) if stored else {})}
    records = result_rows(out)
    if not metric or metric == settings["metric"]:
        return render_sweep_report(records, sweep_status(out), Path(out), settings["metric"], settings["resamples"])
    _require_metric(records, metric, db_path(out))
    return render_sweep_report(records, sweep_status(out), Path(out) / f"by-{metric}", metric, settings["resamples"])


def _require_metric(records: list[dict], metric: str, path: Path) -> None:
    """Raise unless every finished cell has `metric` as a number ('score' every cell has)."""
    def numbers(metrics: dict) -> set[str]:
        return {k for k, v in metrics.items() if isinstance(v, (int, float))}
    missing = [r["label"] for r in records if metric != "score" and metric not in numbers(r["metrics"])]
    if missing:
        raise TellInputError(f"--metric {metric!r} is not a number in the metrics of {len(missing)} cell(s) "
                             f"(e.g. {missing[0]}); known: {', '.join(sorted(numbers(records[0]['metrics'])))}",
                             path)


def render_report(directory: str | Path, metric: str | None = None) -> Path:
    """Return report.md of a sweep (sweep.sqlite) or a compare run (results.json), rendered with its HTML."""
    from tell.report import rerender_compare_report
    directory = Path(directory)
    if db_path(directory).is_file():
        return write_sweep_report(directory, metric)
    if (directory / "results.json").is_file():
        if metric:
            raise TellInputError("--metric applies to sweeps; a compare report shows every metric already",
                                 directory)
        return rerender_compare_report(directory)
    raise TellInputError("not a sweep directory (sweep.sqlite) nor a compare directory (results.json)", directory)
