"""Where a sweep stands: done / running / left cells, the training progress of started cells, and the time
left, estimated from the rates its finished cells measured (defaults until one has finished)."""
from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

from tell.config import RunConfig, config_from_dict
from tell.data import TellInputError
from tell.sweep_store import db_path, open_store, planned_cells, recover_stale

PROGRESS = "training.json"  # in cells/<key>/ while a cell trains: where its run is written (for --status)
RESUME_FILE = "resume.tar.gz"  # in cells/<key>/ of a cell stopped mid-training: its run's last checkpoint
# Used for the time estimate until a cell has finished: fp32 (dtype auto on every CPU) on a 2-core avx2-only CPU,
# PERFORMANCE.md: training ~200 tok/s, generation 1.2-2.3 s a test row by batch size. (The avx512_bf16 machines
# trained 700-715 tok/s in bf16; their fp32 rate is not measured, so this errs long there.) Finished cells
# replace these with what they measured.
DEFAULT_RATES = {"train_tok_s": 200.0, "eval_s_per_row": 2.0, "task_row_tokens": 550.0, "overhead_s": 15.0}
# Mean SmolLM2 tokens per general row, rendered (until a finished cell measures it): Alpaca demo rows; ShareGPT
# conversations cut at 2048 tokens as configs/scale.yaml does (1,483 uncut: 17,390 rows, 2.58e7 tokens).
GENERAL_ROW_TOKENS = {"alpaca": 170.0, "sharegpt": 1358.0}


def sweep_status(out: str | Path) -> dict:
    """Return done / running / left counts of the sweep in `out`, the training progress of started cells and
    the estimated seconds left."""
    path = db_path(out)
    if not path.is_file():
        raise TellInputError("no sweep database here (run `tell sweep --config FILE` first)", path)
    conn = open_store(path)
    recover_stale(conn)
    rows = planned_cells(conn)
    conn.close()
    rates = measured_rates([r for r in rows if r["status"] == "done"], Path(out))
    left = [r for r in rows if r["status"] in ("pending", "failed")]
    running = [r for r in rows if r["status"] == "running"]
    progress = {r["key"]: training_progress(Path(out), r["key"]) for r in left + running}
    estimate = sum(estimate_cell_s(config_from_dict(json.loads(r["config"])), rates, progress[r["key"]])
                   for r in left + running)
    return {"cells": len(rows), "done": sum(r["status"] == "done" for r in rows), "running": len(running),
            "left": len(left), "failed": sum(r["status"] == "failed" for r in rows),
            "estimate_left_s": round(estimate), "rates": rates,
            "running_cells": [{"key": r["key"], "label": r["label"], "pid": r["pid"], "host": r["host"],
                               "elapsed_s": round(time.time() - (r["started"] or time.time())),
                               "training": progress[r["key"]]} for r in running],
            "interrupted_cells": [{"key": r["key"], "label": r["label"], "training": progress[r["key"]]}
                                  for r in left if progress[r["key"]]],
            "failed_cells": [{"key": r["key"], "label": r["label"], "error": (r["error"] or "").splitlines()[0]}
                             for r in rows if r["status"] == "failed"]}


def training_progress(out: Path, key: str) -> dict | None:
    """Return {'steps_done', 'steps_planned'} of a cell whose training started and did not finish (running, or
    killed: it resumes from its last checkpoint), read from its run's `.partial` directory; else None."""
    import yaml
    try:
        files = _run_files(out / "cells" / key, ("config.yaml", "manifest.json", "train_log.jsonl"))
        train = yaml.safe_load(files["config.yaml"])["train"]
        manifest = json.loads(files["manifest.json"])
        done = last_logged_step(files["train_log.jsonl"])
    except (OSError, ValueError, KeyError, TypeError, tarfile.TarError):
        return None
    planned = -(-(manifest["task_rows"] + manifest["general_rows"]) // train["batch_size"]) * train["epochs"]
    return {"steps_done": done, "steps_planned": min(planned, train["max_steps"] or planned)}


def last_logged_step(log: str) -> int:
    """Return the step of a train_log.jsonl's last whole record (a kill may cut the last line); 0 without one."""
    for line in reversed(log.splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def partial_run(cell_dir: Path) -> Path:
    """Return the `.partial` run directory the cell in cell_dir trains (or trained) into; raise if not known."""
    run_dir = Path(json.loads((cell_dir / PROGRESS).read_text(encoding="utf-8"))["run_dir"])
    return run_dir.with_name(run_dir.name + ".partial")


def _run_files(cell_dir: Path, names: tuple[str, ...]) -> dict[str, str]:
    """Return the named files of the run a cell was training: from this machine's `.partial` directory, else
    from the checkpoint packed into the cell's folder (a sweep folder carried to another machine)."""
    partial = partial_run(cell_dir)
    run_dir = partial.with_name(partial.name.removesuffix(".partial"))
    if all((partial / name).is_file() for name in names):
        return {name: (partial / name).read_text(encoding="utf-8") for name in names}
    if (run_dir / "train_summary.json").is_file():  # trained here (stopped in evaluation): nothing to resume
        raise FileNotFoundError(run_dir / "train_summary.json")
    wanted, found = {f"{partial.name}/{name}": name for name in names}, {}
    with tarfile.open(cell_dir / RESUME_FILE) as tar:
        for member in tar:  # one pass through the gzip stream
            if member.name in wanted:
                found[wanted[member.name]] = tar.extractfile(member).read().decode("utf-8")
    return found


def _training_seconds(row, timing: dict, out: Path | None) -> float:
    """Return the wall seconds of a cell's training over all its sittings (its train_summary.json): the cell's
    train stage time counts only the last sitting of a training resumed from a checkpoint."""
    try:
        return float(json.loads((out / "cells" / row["key"] / "train_summary.json").read_text())["wall_s"])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return timing["train_s"]


def measured_rates(done_rows: list, out: Path | None = None) -> dict:
    """Return training tok/s (over all cells, and `train_tok_s_general` over the cells that trained on general
    rows, whose rows may be longer: ShareGPT's 2k-token rows ran at ~155 tok/s where Halu rows ran at ~215),
    eval s per test row (at 192 new tokens) and tokens per task and per general row, measured on finished
    cells where they ran (cached stages take ~0 s and are left out); defaults otherwise (per general pool:
    GENERAL_ROW_TOKENS)."""
    rates, train, evals, sizes, general = dict(DEFAULT_RATES), [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    train_general = [0.0, 0.0]
    for row in done_rows:
        result = json.loads(row["result"])
        metrics, timing, cfg = result["metrics"], result["timing"], json.loads(row["config"])
        if timing.get("train_s", 0) > 5:  # trained by this sweep, not taken from the cache
            seconds = _training_seconds(row, timing, out)
            train[0] += metrics.get("trained_tokens", 0)
            train[1] += seconds
            if metrics.get("general_rows"):
                train_general[0] += metrics.get("trained_tokens", 0)
                train_general[1] += seconds
        if timing.get("eval_s", 0) > 5 and metrics.get("n"):
            budget = metrics.get("generation", {}).get("max_new_tokens") or 192
            evals[0] += metrics["n"] * budget / 192
            evals[1] += timing["eval_s"]
        if metrics.get("task_tokens") and cfg["compare"]["arms"] != "general":
            sizes[0] += metrics["task_tokens"]
            sizes[1] += result.get("task_rows", 0)
        if metrics.get("general_rows"):
            general[0] += metrics["general_tokens"]
            general[1] += metrics["general_rows"]
    for key, (num, den) in (("train_tok_s", train), ("train_tok_s_general", train_general),
                            ("eval_s_per_row", (evals[1], evals[0])),
                            ("task_row_tokens", sizes), ("general_row_tokens", general)):
        if num > 0 and den > 0:
            rates[key] = round(num / den, 3)
    return rates


def estimate_cell_s(cfg: RunConfig, rates: dict, progress: dict | None = None) -> float:
    """Return the predicted wall seconds of one cell: training tokens / tok/s + test rows × s per row; of a
    cell whose training is under way (progress), the part of its training left."""
    arm = cfg.compare.arms
    task_tokens = cfg.compare.task_tokens or cfg.compare.task_rows * rates["task_row_tokens"]
    ratio = 10.0 if str(cfg.mix.ratio) == "max" else float(cfg.mix.ratio)
    general_tokens = cfg.mix.general_tokens or ratio * task_tokens
    general_row_tokens = rates.get("general_row_tokens") or GENERAL_ROW_TOKENS.get(cfg.data.general, 170.0)
    tell_rows = task_tokens / rates["task_row_tokens"] + general_tokens / general_row_tokens
    trained = {"base": 0.0, "base-anchor": 0.0, "sft": task_tokens * cfg.train.epochs,
               "sft-matched": tell_rows * rates["task_row_tokens"] * cfg.train.epochs,
               "tell": (task_tokens + general_tokens) * cfg.train.epochs, "general": general_tokens}[arm]
    if progress and progress["steps_planned"]:
        trained *= 1 - progress["steps_done"] / progress["steps_planned"]
    tok_s = rates["train_tok_s"]
    if arm in ("tell", "general"):
        tok_s = rates.get("train_tok_s_general", tok_s)
    test_rows = cfg.eval.limit or 100
    budget = (cfg.generate.max_new_tokens or 192) / 192
    return rates["overhead_s"] + trained / tok_s + test_rows * rates["eval_s_per_row"] * budget
