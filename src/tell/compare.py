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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tell.config import RunConfig, config_dict, dump_config, keyed_section
from tell.anchor import DEFAULT_ANCHORS, default_anchor_text, resolve_anchor_text  # noqa: F401 (re-exported)
from tell.experiment import (announce, check_output, heldout_general, prepare_mix, resolve_self_instruct,
                             run_train, staged_output, task_from_config, task_selection, test_rows_from_config)
from tell.resume import resume_or_train
from tell.generate import usable_backend
from tell.hardware import machine
from tell.model import cache_dir, pick_device, shared_base

TRAINED_ARMS = {"sft": "sft", "sft-matched": "sft", "tell": "tell", "general": "general"}
# Arms whose prompts carry the anchor at evaluation: the trained-with-anchor arms and the control.
ANCHORED_ARMS = {"base-anchor", "tell", "general"}
# `tell compare`'s own defaults, under the YAML and the flags: the paper's arms and training settings (lr 1e-4,
# batch 16, warmup 0.03, ratio 10) at a size whose run fits 20 min on a 2-core CPU of either kind (measured in
# PERFORMANCE.md; training ~200 tok/s at best on an avx2-only CPU, so ~70k trained tokens in all). The earlier
# default, 15 rows and 100 test rows, is configs/compare-ratio10.yaml. One batch of 48 prompts: larger
# generation batches are faster per row on these CPUs (PERFORMANCE.md, Generation). 16 held-out general rows:
# their loss is a forward pass over ~10k tokens, ~25 s an arm on an avx2-only CPU.
DEFAULTS = {"compare.task_rows": 6, "eval.limit": 48, "generate.batch_size": 48, "eval.general_rows": 16}
QUICK = {"compare.task_rows": 4, "mix.ratio": "3", "eval.limit": 16, "generate.max_new_tokens": 96,
         "eval.general_rows": 8}  # 8 held-out general rows: ~10 s an arm on 2 cores instead of ~20 s


def default_config() -> RunConfig:
    """Return the config `tell compare` starts from (RunConfig's defaults with DEFAULTS over them)."""
    from tell.config_keys import apply_overrides
    return apply_overrides(RunConfig(), DEFAULTS)


def quick_config(cfg: RunConfig) -> RunConfig:
    """Return the --quick variant: 4 task rows, ratio 3, 16 test rows, 96 new tokens (3–6 min on 2 cores)."""
    from tell.config_keys import apply_overrides
    return apply_overrides(copy.deepcopy(cfg), QUICK)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_key(arm_cfg: RunConfig, task_examples) -> str:
    """Return the cache key of an arm's training run: its model, mix, train and anchor settings and task rows."""
    return _key("train", keyed_section(arm_cfg, "model"), keyed_section(arm_cfg, "mix"),
                keyed_section(arm_cfg, "train"), _anchor_key(arm_cfg), arm_cfg.data.general,
                [e.id for e in task_examples], [e.messages for e in task_examples])


def eval_key(cfg: RunConfig, run_dir: Path | None, rows, task_name: str, use_anchor: bool, anchor: str) -> str:
    """Return the cache key of an arm's evaluation: the trained run (its summary), model and generate settings,
    test rows, task and — for an untrained arm — the anchor text."""
    run_key = json.loads((run_dir / "train_summary.json").read_text()) if run_dir else None
    return _key("eval", str(run_dir), run_key, keyed_section(cfg, "model"), keyed_section(cfg, "generate"),
                [r.id for r in rows], task_name, use_anchor, anchor if use_anchor and run_dir is None else "")


def arm_config(cfg: RunConfig, arm: str, tell_steps: int, task_rows: int | None = None) -> RunConfig:
    """Return the training config of a trained arm (mode, anchor, epochs) derived from the user's config."""
    from tell.config import AnchorConfig
    arm_cfg = copy.deepcopy(cfg)
    arm_cfg.mix.mode = TRAINED_ARMS[arm]
    if arm in ("sft", "sft-matched"):
        arm_cfg.anchor = AnchorConfig(placement=cfg.anchor.placement)  # plain SFT, as the paper's baseline
    if arm == "sft-matched":
        steps_per_epoch = math.ceil((task_rows or cfg.compare.task_rows) / cfg.train.batch_size)
        arm_cfg.train.epochs = math.ceil(tell_steps / steps_per_epoch)
        arm_cfg.train.max_steps = tell_steps
    return arm_cfg


# What only a self-instruct anchor reads: a manual anchor's key leaves them out (the key it had before modes).
SELF_INSTRUCT_ONLY = ("mode", "self_instruct_rows", "meta_prompt", "self_instruct_max_new_tokens",
                      "self_instruct_tries")


def _anchor_key(cfg: RunConfig) -> dict:
    """Return the anchor settings that shape a run: all of them, or for a manual anchor all but SELF_INSTRUCT_ONLY."""
    values = keyed_section(cfg, "anchor")
    if cfg.anchor.mode == "manual":
        return {k: v for k, v in values.items() if k not in SELF_INSTRUCT_ONLY}
    return values


def _train_arm(arm_cfg: RunConfig, task_examples, cache: bool, progress: Path | None = None) -> tuple[Path, dict]:
    """Return (run directory, train summary) of an arm, training it unless cached. An interrupted training of
    the same arm continues from its last checkpoint; `progress` (a file) is told where the run is written."""
    run_dir = cache_dir() / "runs" / train_key(arm_cfg, task_examples)
    if not (cache and (run_dir / "train_summary.json").is_file()):
        train_cfg = copy.deepcopy(arm_cfg)
        train_cfg.out = str(run_dir)
        if progress:
            progress.parent.mkdir(parents=True, exist_ok=True)
            progress.write_text(json.dumps({"run_dir": str(run_dir)}) + "\n")
        threads = torch.get_num_threads()  # a resume takes its run's thread count; the next arm must not inherit it
        try:
            if cache:  # an interrupted run of this arm (same key) is a partial cache entry
                resume_or_train(train_cfg, task_examples)
            else:
                run_train(train_cfg, overwrite=True, task_examples=task_examples)
        finally:
            torch.set_num_threads(threads)
    return run_dir, json.loads((run_dir / "train_summary.json").read_text())


def _eval_arm(cfg: RunConfig, arm: str, run_dir: Path | None, task, rows, anchor: str, cache: bool,
              done: set | None = None) -> Path:
    """Return the directory with metrics.json/generations.jsonl of an arm, evaluating unless cached (or
    already evaluated in this comparison: keys in `done`)."""
    from tell.evaluate import evaluate, write_eval
    from tell.generate import load_for_generation
    use_anchor = arm in ANCHORED_ARMS
    key = eval_key(cfg, run_dir, rows, task.name, use_anchor, anchor)
    eval_dir = cache_dir() / "evals" / key
    if (cache or key in (done or ())) and (eval_dir / "metrics.json").is_file():
        return eval_dir
    if done is not None:
        done.add(key)
    run = load_for_generation(str(run_dir) if run_dir else None, cfg.model, cfg.generate.backend)
    if run_dir is None and use_anchor:
        run = replace(run, anchor=anchor, placement=cfg.anchor.placement)
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
    default_anchor(cfg, task)
    announce(cfg)
    check_output(cfg.out, overwrite)
    cfg.generate.backend = usable_backend(cfg.generate.backend)  # before any arm trains
    arms = [a.strip() for a in cfg.compare.arms.split(",") if a.strip()]
    start = time.perf_counter()
    # One base model for every arm: trained on, merged into and evaluated, restored in between.
    with shared_base():
        inputs = arm_inputs(cfg, task)  # validates all input before training
        results, timings = {}, {"prepare": {"prepare_s": round(time.perf_counter() - start, 1)}}
        with staged_output(cfg.out, overwrite) as tmp:
            dump_config(cfg, tmp / "config.yaml")
            for arm in arms:
                results[arm], timings[arm] = _run_arm(cfg, arm, inputs, tmp)
                print(f"[tell] {arm}: " + _headline(results[arm]), flush=True)
            summary = {"task": task.name, "test_rows": len(inputs.rows), "task_rows": len(inputs.task_examples),
                       "ratio": cfg.mix.ratio, "anchor": inputs.anchor, "quick": quick, "selection": inputs.selection,
                       "wall_s": round(time.perf_counter() - start, 1), "stage_wall_s": timings,
                       "machine": machine(pick_device(cfg.model))}
            (tmp / "results.json").write_text(json.dumps({**results, "_summary": summary}, indent=1) + "\n")
            write_compare_report(results, summary, tmp)
    return {**results, "_summary": summary}


def _with_mode(cfg: RunConfig, mode: str) -> RunConfig:
    out = copy.deepcopy(cfg)
    out.mix.mode = mode
    return out


def _run_arm(cfg, arm, inputs: ArmInputs, out_dir: Path) -> tuple[dict, dict]:
    """Return (the arm's metrics + training facts, wall seconds per stage); copies its files to out_dir."""
    metrics, timing, run_dir, eval_dir = arm_result(cfg, arm, inputs)
    if run_dir:
        shutil.copytree(run_dir, out_dir / "runs" / arm)
    shutil.copytree(eval_dir, out_dir / "evals" / arm)
    return metrics, timing


def arm_result(cfg: RunConfig, arm: str, inputs: ArmInputs,
               progress: Path | None = None) -> tuple[dict, dict, Path | None, Path]:
    """Return (metrics + training facts + held-out general loss, wall s per stage, run dir, eval dir) of an
    arm, training and evaluating it unless cached.

    An arm whose adapter is exactly zero (every LoRA B matrix still 0, e.g. the paper's 15-row SFT: one
    optimizer step, at learning rate 0 in warmup) is the base model: it is evaluated as the base model is
    (the same generations and losses, computed once), and its metrics say so under `same_as_base`.
    """
    timing, train_summary, run_dir = {}, {}, None
    if arm in TRAINED_ARMS:
        t0 = time.perf_counter()
        arm_cfg = arm_config(cfg, arm, inputs.tell_steps, len(inputs.task_examples))
        run_dir, train_summary = _train_arm(arm_cfg, inputs.task_examples, cfg.compare.cache, progress)
        timing["train_s"] = round(time.perf_counter() - t0, 1)
    model_dir = None if run_dir is None or adapter_is_zero(run_dir) else run_dir
    t0 = time.perf_counter()
    eval_dir = _eval_arm(cfg, arm, model_dir, inputs.task, inputs.rows, inputs.anchor, cfg.compare.cache, inputs.done)
    timing["eval_s"] = round(time.perf_counter() - t0, 1)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    metrics.update(_arm_diagnostics(arm, run_dir, eval_dir, inputs))
    manifest = json.loads((run_dir / "manifest.json").read_text()) if run_dir else {}
    metrics.update(optimizer_steps=train_summary.get("optimizer_steps", 0),
                   trained_tokens=train_summary.get("trained_tokens", 0),
                   train_flops=train_summary.get("train_flops", 0.0),
                   task_tokens=manifest.get("task_tokens", 0), general_tokens=manifest.get("general_tokens", 0),
                   general_rows=manifest.get("general_rows", 0), train_compute_path=train_summary.get("compute_path"))
    if run_dir is not None and model_dir is None:
        metrics["same_as_base"] = ("the adapter is exactly zero (every LoRA B matrix is 0 after training), so this "
                                   "arm is the base model: its generations and losses are the base model's")
    if inputs.heldout:
        t0 = time.perf_counter()
        metrics.update(_general_loss_arm(cfg, model_dir, inputs.heldout, cfg.compare.cache, inputs.done))
        timing["general_loss_s"] = round(time.perf_counter() - t0, 1)
    return metrics, timing, run_dir, eval_dir


def adapter_is_zero(run_dir: Path) -> bool:
    """Return True when the run's LoRA update B·A is exactly zero (every lora_B weight is 0)."""
    from safetensors.torch import load_file
    path = Path(run_dir) / "adapter" / "adapter_model.safetensors"
    if not path.is_file():
        return False
    weights = load_file(path)
    b_matrices = [w for name, w in weights.items() if "lora_B" in name]
    return bool(b_matrices) and all(not w.any() for w in b_matrices)


def arm_anchor(arm: str, run_dir: Path | None, inputs: ArmInputs) -> str:
    """Return the anchor of an arm: its run's anchor.txt, else the shared anchor where the arm applies it."""
    if run_dir:
        return (run_dir / "anchor.txt").read_text(encoding="utf-8")
    return inputs.anchor if arm in ANCHORED_ARMS else ""


def _arm_diagnostics(arm: str, run_dir: Path | None, eval_dir: Path, inputs: ArmInputs) -> dict:
    """Return the arm's diagnostics from its generations (so an evaluation cached before they existed
    gets them too): label diagnostics, distinct outputs, anchor copies and, for a trained arm, target copies."""
    from tell.evaluate import diagnostics, read_generations, training_targets
    outputs, references = read_generations(eval_dir / "generations.jsonl")
    return diagnostics(inputs.task, outputs, references, arm_anchor(arm, run_dir, inputs),
                       training_targets(run_dir))


def _general_loss_arm(cfg: RunConfig, run_dir: Path | None, heldout, cache: bool, done: set | None = None) -> dict:
    """Return the held-out general loss/perplexity of an arm's model, computing it unless cached (or already
    computed in this comparison: keys in `done`)."""
    from tell.evaluate import general_loss
    from tell.generate import load_for_generation
    run_key = json.loads((run_dir / "train_summary.json").read_text()) if run_dir else None
    key = _key("loss", str(run_dir), run_key, keyed_section(cfg, "model"), [e.messages for e in heldout])
    path = cache_dir() / "losses" / f"{key}.json"
    if (cache or key in (done or ())) and path.is_file():
        return json.loads(path.read_text())
    if done is not None:
        done.add(key)
    run = load_for_generation(str(run_dir) if run_dir else None, cfg.model)
    values = general_loss(run.model, run.tokenizer, list(heldout))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(values) + "\n")
    partial.rename(path)  # atomic: a kill never leaves half a cache entry
    return values


@dataclass(frozen=True)
class ArmInputs:
    """What every arm of one comparison shares: task, test rows, training rows, anchor, TELL's steps."""

    task: object
    rows: list
    task_examples: list
    anchor: str
    tell_steps: int
    heldout: tuple = ()
    done: set = field(default_factory=set)
    """Cache keys of the evaluations and losses computed by this comparison (reused even with --no-cache)."""
    selection: dict | None = None
    """The record of data.select's choice of the task rows (None for the seeded draw)."""


def default_anchor(cfg: RunConfig, task) -> None:
    """Give a manual anchor without text the task's default anchor (in place)."""
    if cfg.anchor.mode == "manual" and not cfg.anchor.text and not cfg.anchor.file:
        cfg.anchor.text = default_anchor_text(task.name)


def arm_inputs(cfg: RunConfig, task, tell_steps: bool = True, task_rows: bool = True) -> ArmInputs:
    """Return the shared inputs of the arms, validating them (TELL's mix is built when tell_steps is asked,
    the task's training rows drawn when task_rows is). A self-instruct anchor is written here, once, so
    every arm sees the same text.
    """
    selection = selected_task_rows(cfg, task) if cfg.data.select and (task_rows or tell_steps) else None
    if selection is not None:
        task_examples = [row.example for row in selection.rows]
    else:
        task_examples = task_examples_for(cfg, task) if task_rows or tell_steps else []
    rows = test_rows_from_config(cfg, task)
    resolve_self_instruct(cfg, task_examples, task.name)
    steps, anchor = 0, resolve_anchor_text(cfg.anchor)
    if tell_steps:
        tell_mix = prepare_mix(_with_mode(cfg, "tell"), task_examples)
        steps = math.ceil(len(tell_mix.mix.rows) / cfg.train.batch_size) * cfg.train.epochs
    return ArmInputs(task, rows, task_examples, anchor, steps, tuple(heldout_general(cfg)),
                     selection=selection.record if selection else None)


def selected_task_rows(cfg: RunConfig, task):
    """Return data.select's choice of compare.task_rows rows (or rows up to compare.task_tokens tokens) from
    data.select_pool, else from the task's whole training pool (select.Selection)."""
    pool = None if cfg.data.select_pool else task.train_examples(None, cfg.mix.seed)
    tokens = cfg.compare.task_tokens
    return task_selection(cfg, pool, 0 if tokens else cfg.compare.task_rows, tokens)


def task_examples_for(cfg: RunConfig, task) -> list:
    """Return the task training rows: compare.task_rows rows of the seeded draw, or, with
    compare.task_tokens, the fewest rows of the same draw whose rendered tokens (no anchor) reach it."""
    target = cfg.compare.task_tokens
    if not target:
        return task.train_examples(cfg.compare.task_rows, cfg.mix.seed)
    from tell.data import TellInputError
    from tell.mix import encode_examples
    from tell.model import load_tokenizer
    tokenizer = load_tokenizer(cfg.mix.count_tokenizer or cfg.model.name)
    pool_rows, counts = len(task.train_examples(None, cfg.mix.seed)), {}

    def tokens(k: int) -> int:  # draws are nested (k rows are among k+1), so tokens grow with k
        rows = task.train_examples(k, cfg.mix.seed)
        new = [e for e in rows if e.id not in counts]
        counts.update({e.id: len(x.input_ids) for e, x in zip(new, encode_examples(tokenizer, new))})
        return sum(counts[e.id] for e in rows)

    high = 1
    while high < pool_rows and tokens(high) < target:
        high = min(2 * high, pool_rows)
    if tokens(high) < target:
        raise TellInputError(f"the task's {pool_rows} training rows hold {tokens(high)} tokens, fewer than "
                             f"compare.task_tokens = {target}", None, None, "compare.task_tokens")
    low = high // 2 + 1 if high > 1 else 1
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if tokens(middle) < target else (low, middle)
    return task.train_examples(high, cfg.mix.seed)


def run_cell(cfg: RunConfig, progress: Path | None = None) -> dict:
    """Return one sweep cell's result: the single arm in cfg.compare.arms trained and evaluated (cached).

    Holds the metrics, wall seconds per stage, the anchor the arm used and where its run/eval files live.
    `progress` (a file) is told where the arm's training run is written, for `tell sweep --status`.
    """
    task = task_from_config(cfg)
    default_anchor(cfg, task)
    cfg.generate.backend = usable_backend(cfg.generate.backend)
    arm = cfg.compare.arms.strip()
    needs_rows = arm in TRAINED_ARMS or (arm == "base-anchor" and cfg.anchor.mode == "self-instruct")
    inputs = arm_inputs(cfg, task, tell_steps=arm == "sft-matched", task_rows=needs_rows)
    metrics, timing, run_dir, eval_dir = arm_result(cfg, arm, inputs, progress)
    anchor = arm_anchor(arm, run_dir, inputs)
    return {"metrics": metrics, "timing": timing, "anchor": anchor, "task_rows": len(inputs.task_examples),
            "run_dir": str(run_dir or ""), "eval_dir": str(eval_dir), "selection": inputs.selection}


def _headline(metrics: dict) -> str:
    keys = [k for k in ("json_adherence_strict", "json_adherence_lenient", "label_accuracy", "label_f1",
                        "majority_baseline", "chrf", "bleu", "exact_match", "regex_match") if k in metrics]
    return ", ".join(f"{k}={metrics[k]:.3f}" for k in keys)
