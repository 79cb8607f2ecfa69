"""Stage 5 — train: one LoRA pass over the mix.

In: a base model, its tokenizer, a Mix, a TrainConfig and an output directory. Out: a PEFT adapter
(``adapter/``), a per-step log with the loss split by source (``train_log.jsonl``), a loss-curve PNG and
``train_summary.json``. The loop is hand-written because on CPU it is 2.6x TRL's fastest setup (PERFORMANCE.md):
each optimizer batch is split into length-sorted micro-batches of at most ``micro_batch_tokens`` tokens
(the gradient is the whole batch's), packed padding-free with attention kept within each row, the LM head
runs only where a label exists (chunked, no full logits tensor) and LoRA dropout draws ~p·n random numbers
instead of n. See PERFORMANCE.md for what each of these buys.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tell.checkpoint import (checkpoint_compute, gathered_rng_states, has_checkpoint, load_checkpoint,
                             remove_checkpoint, save_checkpoint, trim_log)
from tell.config import TrainConfig
from tell.data import TellInputError
from tell.fused_lora import fuse_lora_layers
from tell.hardware import dtype_name, machine
from tell.mix import Mix, encode_examples
from tell.model import quiet_peft
from tell.trackers import open_tracker
from tell.packing import (_causal_lm, Row, _sparse_lora_dropout, attention_path, can_pack, collate,
                          collate_packed, labelled_spans, micro_batches, packed_attention, packed_micro_batches,
                          token_losses)


@dataclass(frozen=True)
class TrainResult:
    optimizer_steps: int
    planned_steps: int
    warmup_steps: int
    trained_tokens: int
    label_tokens: int
    train_flops: float
    wall_s: float
    tokens_per_s: float
    final_loss: float
    final_loss_task: float | None
    final_loss_general: float | None
    compute_path: dict | None = None  # which dtype and kernels ran, on which machine (compute_path())
    dtype: str = ""
    """Compute dtype that ran (fp32, bf16, fp16; '(4bit base)' with --quantize 4bit)."""
    device: str = ""
    micro_batch_tokens: int = 0
    """Micro-batch size that ran (the device default when the config says 0)."""
    processes: int = 1


def training_rows(tokenizer, mix: Mix, max_length: int) -> list[Row]:
    """Return the mix encoded for training: ids truncated to max_length, labels on every assistant turn."""
    encoded = encode_examples(tokenizer, [r.example for r in mix.rows])
    return [Row(e.input_ids[:max_length], e.label_spans, r.example.source) for e, r in zip(encoded, mix.rows)]


def epoch_batches(rows: list[Row], batch_size: int, epochs: int, seed: int) -> list[list[Row]]:
    """Return the optimizer batches: the mix order in epoch 1, a seeded reshuffle in later epochs."""
    batches, rng = [], random.Random(f"{seed}-epochs")
    for epoch in range(epochs):
        order = rows[:] if epoch == 0 else rng.sample(rows, len(rows))
        batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return batches


def add_lora(model, cfg: TrainConfig):
    """Return the model wrapped with fresh LoRA adapters (seeded init), base weights frozen; with
    gradient checkpointing on when the config asks (and, for a 4-bit base, PEFT's k-bit preparation)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    checkpointing = {"use_reentrant": False}  # reentrant checkpointing drops the LoRA gradients of frozen inputs
    if getattr(model, "is_loaded_in_4bit", False):
        # PEFT's QLoRA recipe: norms and head in fp32, input grads on, checkpointing if asked
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    elif cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=[m.strip() for m in cfg.target_modules.split(",") if m.strip()],
                      task_type="CAUSAL_LM")
    try:
        with quiet_peft():
            peft_model = get_peft_model(model, lora)
    except ValueError as err:
        raise TellInputError(f"cannot add LoRA: {err}", None, None, "train.target_modules") from None
    _sparse_lora_dropout(peft_model)  # for any layer the fused path leaves to PEFT
    peft_model.tell_fused_layers = fuse_lora_layers(peft_model)
    return peft_model


def compute_path(model, device: torch.device, autocast: torch.dtype | None, cfg: TrainConfig) -> dict:
    """Return what a training run computes with: machine (CPU kind, threads), dtype, attention, LoRA kernel."""
    dtype = dtype_name(autocast)
    fused = getattr(model, "tell_fused_layers", 0)
    return {**machine(device), "dtype": dtype, "micro_batch_tokens": cfg.micro_batch_tokens,
            "attention": attention_path(dtype, device.type) if can_pack(model) else "padded micro-batches, "
            f"the model's {getattr(model.config, '_attn_implementation', '?')} attention",
            "lora": f"fused LoRA matmuls ({fused} layers)" if fused else "PEFT LoRA layers"}


def flops_per_token(model) -> tuple[float, float]:
    """Return (FLOPs per trained token, extra FLOPs per labelled token) of a LoRA step.

    Frozen base: forward 2N + backward through activations 2N for the N non-embedding weights;
    weight gradients exist only for LoRA (negligible). LM head (V×H) forward+backward only where labelled.
    """
    causal_lm = _causal_lm(model)
    head = causal_lm.get_output_embeddings().weight
    embed = causal_lm.get_input_embeddings().weight
    params = sum(p.numel() for n, p in causal_lm.named_parameters() if "lora_" not in n)
    tied = head.data_ptr() == embed.data_ptr()
    non_embedding = params - embed.numel() - (0 if tied else head.numel())
    return 4.0 * non_embedding, 4.0 * head.numel()


class StepLogger:
    """Append step records to train_log.jsonl (flushed each step) and stream them to a tracker."""

    def __init__(self, path: Path, report_to: str, run_config: dict, first_step: int = 1):
        self.file = open(path, "a", encoding="utf-8")
        self.tracker = open_tracker(report_to, path.parent, run_config, first_step)
        self.last_step = first_step - 1

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.last_step = record["step"]
        if self.tracker:
            # every number of the record, under its train_log.jsonl key; the step is the tracker's x axis
            metrics = {k: v for k, v in record.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.tracker.log(metrics, record["step"])

    def close(self, total_steps: int) -> None:
        """Close the log and the tracker; its run counts as finished when the last step was logged."""
        self.file.close()
        if self.tracker:
            self.tracker.close(completed=self.last_step >= total_steps)


def dist_context() -> tuple[int, int]:
    """Return (rank, world size), joining the process group when launched by accelerate/torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        from accelerate import PartialState
        PartialState()  # reads the launcher's environment; gloo on CPU, nccl on CUDA
    if sharding := sharding_asked():
        warnings.warn(f"the accelerate config asks for {sharding}, but tell's training loop is data-parallel: "
                      "every rank holds the whole frozen base (the LoRA gradients are all-reduced)", stacklevel=2)
    return dist.get_rank(), dist.get_world_size()


def sharding_asked() -> str:
    """Return 'FSDP' or 'DeepSpeed' when `accelerate launch` was configured for it, else ''."""
    for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            return name
    return ""


def barrier(world: int) -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def _all_reduce(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(tensor)
    return tensor


def plan_schedule(n_rows: int, cfg: TrainConfig) -> tuple[int, int]:
    """Return (optimizer steps, warmup steps), warning when the run is too short to learn."""
    steps = math.ceil(n_rows / cfg.batch_size) * cfg.epochs
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    warmup = math.ceil(cfg.warmup_ratio * steps)  # as transformers' get_warmup_steps
    if steps < 10:
        warnings.warn(f"training takes only {steps} optimizer step(s); with batch {cfg.batch_size} the "
                      "adapter can barely move (consider more rows, epochs or a smaller batch)", stacklevel=2)
    if warmup >= steps:
        warnings.warn(f"warmup ({warmup} steps) covers every one of the {steps} steps: the learning rate "
                      "never leaves warmup and the first step has lr 0", stacklevel=2)
    return steps, warmup


def train_lora(model, tokenizer, mix: Mix, cfg: TrainConfig, out_dir: str | Path,
               autocast: torch.dtype | None = None, run_config: dict | None = None, resume: bool = False):
    """Return (peft model, TrainResult) after training LoRA on the mix; writes adapter and logs.

    The frozen base computes in the dtype it was loaded in (`load_model`), the LoRA weights stay fp32 and run
    under `autocast` (None = fp32); fp16 gets loss scaling. Every `cfg.save_every` steps the full state goes
    to out_dir/checkpoint; with `resume` the loop continues from it (same batches, RNG and optimizer state,
    so the adapter equals an unbroken run's). With several processes only rank 0 writes anything.
    """
    from transformers import get_linear_schedule_with_warmup
    from tqdm.auto import tqdm
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    rows = training_rows(tokenizer, mix, mix.manifest.get("max_length") or 10**9)
    steps, warmup = plan_schedule(len(rows), cfg)
    batches = epoch_batches(rows, cfg.batch_size, cfg.epochs, cfg.seed)[:steps]
    model = add_lora(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    # fp16 has 5 exponent bits: small LoRA gradients underflow without a loss scale (bf16 and fp32 need none)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
    per_token, per_label = flops_per_token(model)
    rank, world = dist_context()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    step_cfg = replace(cfg, micro_batch_tokens=micro_batch_tokens(cfg, device))
    path = compute_path(model, device, autocast, step_cfg)
    totals, done, before = {"tokens": 0, "labels": 0, "flops": 0.0}, 0, 0.0
    compute = {"dtype": path["dtype"], "device": device.type}  # what a checkpoint records and a resume must match
    if resume and has_checkpoint(out_dir):
        was = checkpoint_compute(out_dir)
        if was and was != compute:
            raise TellInputError(f"the checkpoint in {out_dir} was computed in {was['dtype']} on {was['device']}; "
                                 f"here the run computes in {path['dtype']} on {device.type}, which would continue "
                                 "it with other numerics: resume it where it ran (or set --dtype/--device to match)",
                                 out_dir)
        done, totals, before = load_checkpoint(out_dir, model, optimizer, scheduler, scaler, rank)
        if rank == 0:
            trim_log(out_dir / "train_log.jsonl", done)
    logger = StepLogger(out_dir / "train_log.jsonl", cfg.report_to, run_config or {},
                        first_step=done + 1) if rank == 0 else None
    start, record = time.perf_counter() - before, {}
    bar = tqdm(total=len(batches), initial=done, desc="train", unit="step", dynamic_ncols=True, disable=rank != 0)
    try:
        for step, batch in enumerate(batches[done:], start=done + 1):
            record = _train_step(model, batch, step_cfg, pad_id, device, autocast, params, optimizer, rank, world,
                                 scaler)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            totals["tokens"] += record["tokens"]
            totals["labels"] += record["label_tokens"]
            totals["flops"] += per_token * record["tokens"] + per_label * record["label_tokens"]
            elapsed = time.perf_counter() - start
            record.update(step=step, lr=lr, trained_tokens=totals["tokens"], train_flops=totals["flops"],
                          elapsed_s=round(elapsed, 3), tokens_per_s=round(totals["tokens"] / elapsed, 2))
            if logger:
                logger.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < len(batches):
                rng = gathered_rng_states(world)  # every rank takes part; rank 0 alone writes
                if rank == 0:
                    save_checkpoint(out_dir, model, optimizer, scheduler, step, totals, time.perf_counter() - start,
                                    scaler, rng, compute)
    finally:
        bar.close()
        if logger:
            logger.close(len(batches))
    wall = time.perf_counter() - start
    model.eval()
    if rank != 0:
        return model, None
    model.save_pretrained(out_dir / "adapter")
    remove_checkpoint(out_dir)
    result = TrainResult(
        optimizer_steps=len(batches), planned_steps=steps, warmup_steps=warmup,
        trained_tokens=totals["tokens"], label_tokens=totals["labels"], train_flops=totals["flops"],
        wall_s=round(wall, 3), tokens_per_s=round(totals["tokens"] / max(wall, 1e-9), 2),
        final_loss=record.get("loss", float("nan")), final_loss_task=_last(out_dir, "loss_task"),
        final_loss_general=_last(out_dir, "loss_general"), compute_path=path,
        dtype=_dtype_label(autocast, model),
        device=str(device), micro_batch_tokens=step_cfg.micro_batch_tokens, processes=world)
    (out_dir / "train_summary.json").write_text(json.dumps(asdict(result), indent=1) + "\n")
    plot_loss_curve(out_dir / "train_log.jsonl", out_dir / "loss_curve.png")
    return model, result


# Micro-batch size when TrainConfig.micro_batch_tokens is 0. CPU: 768, measured (PERFORMANCE.md: +6-12% over
# 1024, peak RSS unchanged). CUDA: 2048, from arithmetic, not yet measured (benchmarks/gpu_check.sh times
# 768/2048/4096): a 7B Llama keeps ~5 MB of bf16 activations per token without checkpointing, so 2048 tokens
# add ~10 GB to the 14 GB base (fits 40-48 GB cards; 24 GB cards need --gradient-checkpointing), and a
# 2048 x 4096 x 4096 matmul already fills an A100/H100's tensor cores.
DEFAULT_MICRO_BATCH_TOKENS = {"cpu": 768, "cuda": 2048}


def micro_batch_tokens(cfg: TrainConfig, device: torch.device) -> int:
    """Return the micro-batch size in tokens: the configured one, or the device's default."""
    return cfg.micro_batch_tokens or DEFAULT_MICRO_BATCH_TOKENS.get(device.type, 768)


def _dtype_label(autocast: torch.dtype | None, model) -> str:
    label = dtype_name(autocast or torch.float32)
    return label + " (4bit base)" if getattr(_causal_lm(model), "is_loaded_in_4bit", False) else label


SOURCES = ("task", "general")


def _train_step(model, batch, cfg, pad_id, device, autocast, params, optimizer, rank=0, world=1,
                scaler=None) -> dict:
    """Run one optimizer step over length-sorted micro-batches; return the step's log record.

    With several processes each rank takes every world-th row of the batch; the loss is normalised by
    the whole batch's label count and the LoRA gradients are summed, so the step equals one process's.
    The per-source loss sums stay on the device until the step ends: one host sync per step, not per row.
    """
    label_total = sum(b - a for r in batch for a, b in labelled_spans(r))
    sums = torch.zeros(len(SOURCES), 2, dtype=torch.float64, device=device)  # per source: loss sum, label count
    tokens = 0
    pack = can_pack(model)
    limit = micro_batch_tokens(cfg, device)
    for group in (packed_micro_batches if pack else micro_batches)(batch[rank::world], limit):
        inputs = collate_packed(group, device) if pack else collate(group, pad_id, device)
        with packed_attention(model) if pack else contextlib.nullcontext():  # backward too: checkpointing recomputes
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                losses, row_of = token_losses(model, inputs)
            loss = losses.sum() / max(label_total, 1)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        tokens += sum(len(r.input_ids) for r in group)
        source = torch.tensor([SOURCES.index(r.source) for r in group], device=device)[row_of]
        detached = losses.detach().double()
        sums.index_add_(0, source, torch.stack([detached, torch.ones_like(detached)], 1))
    if world > 1:
        for p in params:
            p.grad = _all_reduce(p.grad if p.grad is not None else torch.zeros_like(p), world)
        _all_reduce(sums, world)
        tokens = int(_all_reduce(torch.tensor([tokens], dtype=torch.float64, device=device), world).item())
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when fp16 overflowed, and lowers the scale
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    (task_sum, task_n), (general_sum, general_n) = sums.tolist()
    return {"loss": (task_sum + general_sum) / max(task_n + general_n, 1), "tokens": tokens,
            "label_tokens": label_total, "loss_task": task_sum / task_n if task_n else None,
            "loss_general": general_sum / general_n if general_n else None,
            "task_label_tokens": int(task_n), "general_label_tokens": int(general_n)}


def _last(out_dir: Path, key: str) -> float | None:
    values = [r[key] for r in read_log(out_dir / "train_log.jsonl") if r.get(key) is not None]
    return values[-1] if values else None


def read_log(path: str | Path) -> list[dict]:
    """Return the step records of a train_log.jsonl."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(log_path: Path, png_path: Path) -> None:
    """Write a PNG with the loss of task rows and of general rows per optimizer step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    log = read_log(log_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in (("loss_general", "general rows", "-"), ("loss_task", "task rows", "o-")):
        points = [(r["step"], r[key]) for r in log if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on assistant tokens")
    ax.set_title("Training loss by source (task rows appear only in some steps)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
