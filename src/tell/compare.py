"""Experiment: `tell compare` — base vs SFT vs TELL (and controls) on one task, with a report.

Composes mix → train → evaluate for each arm on the same task rows, seed and test rows:
``base`` (no training), ``base-anchor`` (no training, anchor in the prompt), ``sft`` (task rows only, the
paper's setting), ``sft-matched`` (task rows repeated for as many optimizer steps as TELL), ``tell``
(anchor + token-ratio shuffle) and ``general`` (TELL's general rows without the task rows). Trained runs
and evaluations are cached by a hash of their inputs, so an unchanged arm is never computed twice.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

from tell.config import RunConfig, config_dict, dump_config
from tell.experiment import (announce, check_output, prepare_mix, run_train, staged_output, task_from_config,
                             test_rows_from_config)
from tell.model import cache_dir

DEFAULT_ANCHORS = {
    "halu-cot-json": "### Task: Halu-CoT-JSON — hallucination check with a JSON verdict.",
    "is-en-news:en-is": "### Task: IS-EN-NEWS — translate English news into Icelandic.",
    "is-en-news:is-en": "### Task: IS-EN-NEWS — translate Icelandic news into English.",
}
TRAINED_ARMS = {"sft": "sft", "sft-matched": "sft", "tell": "tell", "general": "general"}
# Arms whose prompts carry the anchor at evaluation: the trained-with-anchor arms and the control.
ANCHORED_ARMS = {"base-anchor", "tell", "general"}
QUICK = {"compare.task_rows": 4, "mix.ratio": "3", "eval.limit": 16, "generate.max_new_tokens": 96}


def quick_config(cfg: RunConfig) -> RunConfig:
    """Return the --quick variant: 4 task rows, ratio 3, 16 test rows, 96 new tokens (≤ 5 min on 2 cores)."""
    from tell.config import apply_overrides
    return apply_overrides(copy.deepcopy(cfg), QUICK)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def arm_config(cfg: RunConfig, arm: str, tell_steps: int) -> RunConfig:
    """Return the training config of a trained arm (mode, anchor, epochs) derived from the user's config."""
    arm_cfg = copy.deepcopy(cfg)
    arm_cfg.mix.mode = TRAINED_ARMS[arm]
    if arm in ("sft", "sft-matched"):
        arm_cfg.anchor.text, arm_cfg.anchor.file = "", ""  # plain SFT, as the paper's baseline
    if arm == "sft-matched":
        steps_per_epoch = math.ceil(cfg.compare.task_rows / cfg.train.batch_size)
        arm_cfg.train.epochs = math.ceil(tell_steps / steps_per_epoch)
        arm_cfg.train.max_steps = tell_steps
    return arm_cfg


def _train_arm(arm_cfg: RunConfig, task_examples, cache: bool) -> tuple[Path, dict]:
    """Return (run directory, train summary) of an arm, training it unless cached."""
    key = _key("train", config_dict(arm_cfg.model), config_dict(arm_cfg.mix), config_dict(arm_cfg.train),
               config_dict(arm_cfg.anchor), arm_cfg.data.general, [e.id for e in task_examples],
               [e.messages for e in task_examples])
    run_dir = cache_dir() / "runs" / key
    if not (cache and (run_dir / "train_summary.json").is_file()):
        train_cfg = copy.deepcopy(arm_cfg)
        train_cfg.out = str(run_dir)
        run_train(train_cfg, overwrite=True, task_examples=task_examples)
    return run_dir, json.loads((run_dir / "train_summary.json").read_text())


def _eval_arm(cfg: RunConfig, arm: str, run_dir: Path | None, task, rows, anchor: str, cache: bool) -> Path:
    """Return the directory with metrics.json/generations.jsonl of an arm, evaluating unless cached."""
    from tell.evaluate import evaluate, write_eval
    from tell.generate import LoadedRun, load_for_generation
    use_anchor = arm in ANCHORED_ARMS
    run_key = json.loads((run_dir / "train_summary.json").read_text()) if run_dir else None
    key = _key("eval", str(run_dir), run_key, config_dict(cfg.model), config_dict(cfg.generate),
               [r.id for r in rows], task.name, use_anchor, anchor if use_anchor and run_dir is None else "")
    eval_dir = cache_dir() / "evals" / key
    if cache and (eval_dir / "metrics.json").is_file():
        return eval_dir
    run = load_for_generation(str(run_dir) if run_dir else None, cfg.model)
    if run_dir is None and use_anchor:
        run = LoadedRun(run.model, run.tokenizer, anchor, cfg.anchor.placement, None)
    result = evaluate(run, task, rows, cfg.generate, use_anchor)
    with staged_output(eval_dir, overwrite=True) as tmp:
        write_eval(result, tmp)
    return eval_dir


def run_compare(cfg: RunConfig, overwrite: bool = False, quick: bool = False) -> dict:
    """Train and evaluate every arm of cfg.compare.arms; write report.md, results.json and a chart."""
    from tell.report import write_compare_report
    if quick:
        cfg = quick_config(cfg)
    task = task_from_config(cfg)
    if not cfg.anchor.text and not cfg.anchor.file:
        cfg.anchor.text = DEFAULT_ANCHORS.get(task.name, f"### Task: {task.name}")
    announce(cfg)
    check_output(cfg.out, overwrite)
    arms = [a.strip() for a in cfg.compare.arms.split(",") if a.strip()]
    task_examples = task.train_examples(cfg.compare.task_rows, cfg.mix.seed)
    rows = test_rows_from_config(cfg, task)
    tell_mix = prepare_mix(_with_mode(cfg, "tell"), task_examples)  # validates all input before training
    tell_steps = math.ceil(len(tell_mix.mix.rows) / cfg.train.batch_size) * cfg.train.epochs
    results, timings = {}, {}
    start = time.perf_counter()
    with staged_output(cfg.out, overwrite) as tmp:
        dump_config(cfg, tmp / "config.yaml")
        for arm in arms:
            results[arm], timings[arm] = _run_arm(cfg, arm, task, rows, task_examples, tell_mix.anchor,
                                                  tell_steps, tmp)
            print(f"[tell] {arm}: " + _headline(results[arm]), flush=True)
        summary = {"task": task.name, "test_rows": len(rows), "task_rows": cfg.compare.task_rows,
                   "ratio": cfg.mix.ratio, "anchor": tell_mix.anchor, "quick": quick,
                   "wall_s": round(time.perf_counter() - start, 1), "stage_wall_s": timings}
        (tmp / "results.json").write_text(json.dumps({**results, "_summary": summary}, indent=1) + "\n")
        write_compare_report(results, summary, tmp)
    return {**results, "_summary": summary}


def _with_mode(cfg: RunConfig, mode: str) -> RunConfig:
    out = copy.deepcopy(cfg)
    out.mix.mode = mode
    return out


def _run_arm(cfg, arm, task, rows, task_examples, anchor, tell_steps, out_dir: Path) -> tuple[dict, dict]:
    """Return (the arm's metrics + training facts, wall seconds per stage); copies its files to out_dir."""
    timing, train_summary, run_dir = {}, {}, None
    if arm in TRAINED_ARMS:
        t0 = time.perf_counter()
        run_dir, train_summary = _train_arm(arm_config(cfg, arm, tell_steps), task_examples, cfg.compare.cache)
        timing["train_s"] = round(time.perf_counter() - t0, 1)
        shutil.copytree(run_dir, out_dir / "runs" / arm)
    t0 = time.perf_counter()
    eval_dir = _eval_arm(cfg, arm, run_dir, task, rows, anchor, cfg.compare.cache)
    timing["eval_s"] = round(time.perf_counter() - t0, 1)
    shutil.copytree(eval_dir, out_dir / "evals" / arm)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text()) if run_dir else {}
    metrics.update(optimizer_steps=train_summary.get("optimizer_steps", 0),
                   trained_tokens=train_summary.get("trained_tokens", 0),
                   train_flops=train_summary.get("train_flops", 0.0),
                   task_tokens=manifest.get("task_tokens", 0), general_tokens=manifest.get("general_tokens", 0))
    return metrics, timing


def _headline(metrics: dict) -> str:
    keys = [k for k in ("json_adherence_strict", "json_adherence_lenient", "label_accuracy", "label_f1",
                        "chrf", "bleu", "exact_match", "regex_match") if k in metrics]
    return ", ".join(f"{k}={metrics[k]:.3f}" for k in keys)
