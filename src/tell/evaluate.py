"""Stage 7 — evaluate: generate answers to a task's test rows and score them.

In: a loaded model (base, or base + adapter with the run's anchor), a Task, its test rows and a
GenerateConfig. Out: an ``EvalResult`` — metrics (the task's keys, with 95% bootstrap intervals under
``ci95``) and one record per row — written as ``metrics.json``, ``generations.jsonl`` and ``anchor.txt``.
Rows whose prompt plus answer budget exceeds the model's context are skipped and counted, never dropped.
``general_loss`` scores held-out general rows (mean answer-token loss and perplexity): what a fine-tune
cost the model's general ability. ``diagnostics`` adds what tells judging from copying: the majority
baseline, the labels predicted, distinct outputs, and how many outputs copy the anchor or a training target.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tell.diagnostics import output_diagnostics
from tell.config import GenerateConfig
from tell.data import Example, TellInputError, read_records
from tell.generate import LoadedRun, answer_texts, answer_token_count, generation_path, prompt_texts
from tell.mix import encode_examples
from tell.model import context_length
from tell.packing import (Row, can_pack, collate, collate_packed, micro_batches, packed_micro_batches,
                          token_losses)
from tell.tasks import Task, TestRow


@dataclass(frozen=True)
class EvalResult:
    metrics: dict
    rows: list[dict]
    anchor: str = ""
    """The run's anchor (what anchor_copy_rate counts copies of), written as anchor.txt beside the metrics."""


def fitting_rows(run: LoadedRun, rows: list[TestRow], texts: list[str], max_new_tokens: int):
    """Return (rows, texts) whose prompt + answer budget fit the context, and the skipped count."""
    if run.model is not None:
        limit = context_length(run.model)
    else:  # vLLM backend: weights are not loaded here, read the context from the config
        from transformers import AutoConfig
        limit = context_length(AutoConfig.from_pretrained(run.model_path))
    keep = [i for i, t in enumerate(texts)
            if len(run.tokenizer(t, add_special_tokens=False)["input_ids"]) + max_new_tokens <= limit]
    return [rows[i] for i in keep], [texts[i] for i in keep], len(rows) - len(keep)


def evaluate(run: LoadedRun, task: Task, rows: list[TestRow], cfg: GenerateConfig,
             use_anchor: bool = True, progress: bool = True) -> EvalResult:
    """Return metrics and per-row records of the model's answers to `rows`."""
    if not rows:
        raise TellInputError("no test rows to evaluate", None, None, "eval.limit")
    max_new_tokens = cfg.max_new_tokens or task.max_new_tokens
    texts = prompt_texts(run, [r.messages for r in rows], use_anchor)
    rows, texts, skipped = fitting_rows(run, rows, texts, max_new_tokens)
    if not rows:
        raise TellInputError(f"every test row is longer than the model's context minus {max_new_tokens} "
                             "new tokens", None, None, "eval.test")
    start = time.perf_counter()
    outputs = answer_texts(run, texts, cfg, max_new_tokens, progress)
    wall = time.perf_counter() - start
    references = [r.reference for r in rows]
    scores = task.row_scores(outputs, references)
    records = [{"id": r.id, "prompt": t, "output": o, "reference": r.reference, "score": s}
               for r, t, o, s in zip(rows, texts, outputs, scores)]
    metrics = task.score(outputs, references)
    metrics.update(diagnostics(task, outputs, references, run.anchor, run_targets(run)))
    new_tokens = answer_token_count(run.tokenizer, outputs, max_new_tokens)
    metrics.update(task=task.name, skipped_too_long=skipped, anchor_applied=bool(use_anchor and run.anchor),
                   generation={**asdict(cfg), "max_new_tokens": max_new_tokens}, backend=cfg.backend,
                   dtype=_dtype_of(run), generate_wall_s=round(wall, 2), new_tokens=new_tokens,
                   new_tokens_per_s=round(new_tokens / max(wall, 1e-9), 2),
                   compute_path=generation_path(run, cfg))
    return EvalResult(metrics, records, run.anchor)


def _dtype_of(run: LoadedRun) -> str:
    """Return the dtype the answers were computed in (fp32, bf16, fp16), as a reader of metrics.json needs."""
    from tell.model import dtype_name, resolved_dtype
    if run.model is None:  # vLLM: the dtype it was given
        return dtype_name(resolved_dtype(run.config.model)) if run.config else "auto"
    return dtype_name(getattr(run.model, "dtype", None) or next(run.model.parameters()).dtype)


def write_eval(result: EvalResult, out_dir: str | Path) -> None:
    """Write generations.jsonl (one record per row), metrics.json and anchor.txt into out_dir (so `tell score`
    finds the anchor there)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "generations.jsonl", "w", encoding="utf-8") as f:
        for record in result.rows:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=1, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    (out_dir / "anchor.txt").write_text(result.anchor, encoding="utf-8")


def diagnostics(task: Task, outputs: list[str], references: list[str], anchor: str | None,
                targets: list[str] | None) -> dict:
    """Return the diagnostics of a set of answers: the task's label diagnostics (``majority_baseline``,
    ``predicted_label_counts``; none for a label-free task) and diagnostics.output_diagnostics
    (``distinct_output_fraction``, ``anchor_copy_rate`` if the anchor is known, ``target_copy_rate`` if
    the training targets are)."""
    labels = task.label_diagnostics(outputs, references) if task.label_diagnostics else {}
    return {**labels, **output_diagnostics(outputs, anchor, targets)}


def training_targets(run_dir: str | Path | None) -> list[str] | None:
    """Return the answers of the task rows a run trained on (from its mix.jsonl), or None when unknown."""
    path = Path(run_dir) / "mix.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return None
    return [rec["messages"][-1]["content"] for _, rec in read_records(path) if rec.get("source") == "task"]


def run_targets(run: LoadedRun) -> list[str] | None:
    """Return the training targets of a loaded run (None for a plain model)."""
    return training_targets(Path(run.adapter_dir).parent) if run.adapter_dir else None


def read_generations(path: str | Path) -> tuple[list[str], list[str]]:
    """Return (outputs, references) of a generations file; each row needs string `output` and `reference`."""
    outputs, references = [], []
    for line, rec in read_records(path):
        for key in ("output", "reference"):
            if not isinstance(rec.get(key), str):
                raise TellInputError("missing or non-string field", path, line, key)
        outputs.append(rec["output"])
        references.append(rec["reference"])
    return outputs, references


def score_generations(task: Task, path: str | Path, anchor: str | None = None,
                      targets: list[str] | None = None) -> dict:
    """Return the task's metrics and diagnostics recomputed from a generations file (no model); the anchor
    and training targets, where given, add anchor_copy_rate and target_copy_rate."""
    outputs, references = read_generations(path)
    metrics = task.score(outputs, references)
    metrics.update(diagnostics(task, outputs, references, anchor, targets))
    metrics["task"] = task.name
    return metrics


@torch.inference_mode()
def general_loss(model, tokenizer, examples: list[Example], max_batch_tokens: int = 1024) -> dict:
    """Return the mean loss (nats per answer token) and perplexity of the model on held-out general rows.

    Loss is counted on the answer tokens only, as in training, and computed the way training computes it:
    rows packed padding-free where the model allows, the LM head only at answer tokens: for the 32 default
    held-out rows (23k tokens) 50-53 s instead of 63-68 s with padded batches and full logits, the loss equal
    to 1e-4 (2-core avx2-only CPU, paired runs).
    """
    if not examples:
        return {}
    device = next(model.parameters()).device
    limit = context_length(model)
    # The last answer only, as before training labelled every turn: held-out losses stay comparable.
    rows = [Row(e.input_ids[:limit], ((e.prompt_tokens, len(e.input_ids)),), "general")
            for e in encode_examples(tokenizer, examples)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pack = can_pack(model)
    total, count = 0.0, 0
    for group in (packed_micro_batches if pack else micro_batches)(rows, max_batch_tokens):  # under inference_mode
        losses, _ = token_losses(model, collate_packed(group, device) if pack else collate(group, pad_id, device))
        total, count = total + float(losses.double().sum()), count + losses.numel()
    mean = total / max(count, 1)
    return {"general_loss": round(mean, 5), "general_ppl": round(math.exp(mean), 4),
            "general_loss_rows": len(examples), "general_loss_tokens": count}
