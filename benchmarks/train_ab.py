"""Benchmark: paired A/B of training settings inside one process, for gains smaller than the machine's noise.

On the shared 2-core CPU, two runs of the same code differ by up to ±10% (and by 2x over minutes), so a 5%
change cannot be read off two separate runs. Here every optimizer batch of the benchmark mix (the one
``train_throughput.py`` uses) is trained once under each setting, in an order that alternates from batch to
batch, and each setting's tokens/s is summed over the same batches. Prints one JSON object.

A setting is a name and the values it assigns (every other path a setting touches keeps its default): ``module.ATTR`` (a module attribute, e.g.
``tell.packing.BIAS_CACHE_BYTES``), ``module.Class.ATTR`` (a class attribute) or ``cfg.FIELD`` (one of the TrainConfig
fields a training step reads: the model, its LoRA layers and the optimizer are built once, before any
setting applies, and every setting trains the same model in turn, so a batch gets one optimizer step per
setting; that changes the figures' weights, not the work of a step). A module attribute must be read where
it is defined, not imported by value elsewhere, or the setting changes nothing.

    python benchmarks/train_ab.py --steps 6 \\
        --setting 'mb512={"cfg.micro_batch_tokens": 512}' --setting 'mb768={"cfg.micro_batch_tokens": 768}'
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
import warnings
from pathlib import Path


def parse_setting(text: str) -> tuple[str, dict]:
    name, _, values = text.partition("=")
    if not name or not values:
        raise SystemExit(f"--setting wants NAME={{json}}, got {text!r}")
    return name, json.loads(values)


# TrainConfig fields that tell.train._train_step reads; the others take effect before the first step.
PER_STEP_FIELDS = ("micro_batch_tokens", "max_grad_norm")


def owner_and_name(path: str, cfg):
    """Return (object, attribute name) that a setting path names."""
    if path.startswith("cfg."):
        if path[4:] not in PER_STEP_FIELDS:
            raise SystemExit(f"{path!r}: only {', '.join(PER_STEP_FIELDS)} change a step once training runs")
        return cfg, path[4:]
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        name = ".".join(parts[:split])
        try:
            owner = importlib.import_module(name)
            break
        except ModuleNotFoundError as err:
            if err.name != name:  # the module exists but an import inside it failed
                raise
            continue
    else:
        raise SystemExit(f"no module in {path!r}")
    for attr in parts[split:-1]:
        owner = getattr(owner, attr, None)
    if owner is None or not hasattr(owner, parts[-1]):
        raise SystemExit(f"{path!r} does not exist")
    return owner, parts[-1]


def apply(values: dict, defaults: dict, cfg) -> None:
    """Restore every path any setting touches to its default, then assign this setting's values."""
    for path, value in (defaults | values).items():
        setattr(*owner_and_name(path, cfg), value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", action="append", required=True, help="NAME={json}; give two or more")
    parser.add_argument("--steps", type=int, default=6, help="batches, each trained once per setting")
    parser.add_argument("--task-rows", type=int, default=15)
    parser.add_argument("--ratio", default="3")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="training dtype (auto: bf16 where the CPU computes it natively, else fp32)")
    args = parser.parse_args()
    settings = dict(parse_setting(s) for s in args.setting)
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from train_throughput import benchmark_dtype, build_mix, cpu_kind
    from tell.config import ModelConfig, TrainConfig
    from tell.model import load_model
    from tell.train import _train_step, add_lora, epoch_batches, training_rows
    warnings.simplefilter("ignore")
    dtype = benchmark_dtype(args.dtype)
    model, tokenizer = load_model(ModelConfig(device="cpu", dtype=dtype))  # loaded in it: tell casts no model
    cfg = TrainConfig()
    rows = training_rows(tokenizer, build_mix(args.task_rows, args.ratio, tokenizer), 10**9)
    batches = epoch_batches(rows, cfg.batch_size, 1, cfg.seed)
    autocast = torch.bfloat16 if dtype == "bf16" else None
    model = add_lora(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)

    def step(batch) -> int:
        return _train_step(model, batch, cfg, tokenizer.pad_token_id, torch.device("cpu"), autocast,
                           params, optimizer)["tokens"]
    step(batches[0])  # warm-up, not counted
    defaults = {path: getattr(*owner_and_name(path, cfg)) for values in settings.values() for path in values}
    names, totals = list(settings), {name: [0.0, 0] for name in settings}
    for i, batch in enumerate(batches[1:args.steps + 1]):
        for name in names if i % 2 == 0 else names[::-1]:
            apply(settings[name], defaults, cfg)
            start = time.perf_counter()
            totals[name][1] += step(batch)
            totals[name][0] += time.perf_counter() - start
    print(json.dumps({"benchmark": "train_ab", "steps": min(args.steps, len(batches) - 1),
                      "dtype": "bf16" if autocast else "fp32", "cpu": cpu_kind(),
                      "tokens_per_s": {name: round(t / s, 1) for name, (s, t) in totals.items()},
                      "settings": settings}))


if __name__ == "__main__":
    main()
