"""Experiment helper — continue an interrupted training run from its last checkpoint.

`tell train --resume OUT` continues the run in ``OUT.partial`` as it was configured; `resume_or_train` (a
compare arm, a sweep cell) continues it only when its settings and mix equal the new run's, and otherwise
trains from scratch, saying which setting differs. Either way the finished run is renamed to ``OUT``.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

from tell.checkpoint import checkpoint_compute, has_checkpoint
from tell.config import RunConfig, added_later, config_dict, config_from_dict, dump_config
from tell.data import TellInputError
from tell.experiment import prepare_mix, run_train
from tell.hardware import dtype_name
from tell.mix import Mix, mix_lines, read_mix
from tell.model import autocast_dtype, load_model, pick_device


def resume_train(out: str | Path):
    """Continue a killed `tell train` from the checkpoint in `<out>.partial`; return the TrainResult (None on
    ranks other than 0: every rank resumes its share, rank 0 alone writes, then renames the run)."""
    from tell.train import barrier, dist_context, train_lora
    rank, world = dist_context()
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if not has_checkpoint(partial):
        raise TellInputError(f"nothing to resume: no checkpoint in {partial} (a finished run is {out})", out)
    cfg = config_from_dict(yaml.safe_load((partial / "config.yaml").read_text(encoding="utf-8")))
    mix = read_mix(partial)
    model, tokenizer = load_model(cfg.model)
    _, result = train_lora(model, tokenizer, mix, cfg.train, partial, autocast_dtype(cfg.model, pick_device(cfg.model)),
                           run_config=config_dict(cfg), resume=True)
    barrier(world)  # rank 0 has written the adapter and summary before the run directory is renamed
    if rank != 0:
        return None
    dump_config(cfg, partial / "config.yaml", runtime={"train": result.compute_path})
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return result


# Settings that shape the trained adapter; an interrupted run resumes only when its own equal the new run's.
RESUME_SECTIONS = ("model", "data", "anchor", "mix", "train")
RESUME_IGNORED = ("train.save_every", "train.report_to")


def resume_or_train(cfg: RunConfig, task_examples=None):
    """Train cfg into cfg.out, continuing from the checkpoint in `<out>.partial` when that interrupted run
    had the same settings and the same mix (e.g. a sweep cell killed mid-training), else from scratch,
    saying why; return the TrainResult."""
    out = Path(cfg.out)
    partial = out.with_name(out.name + ".partial")
    prepared = prepare_mix(cfg, task_examples)
    if has_checkpoint(partial):
        differs = partial_differs(cfg, prepared.mix, partial)
        if not differs:
            print(f"[tell] resuming the interrupted training in {partial} from its last checkpoint", file=sys.stderr)
            return resume_train(out)
        print(f"[tell] {partial} holds an interrupted run with another {differs}: training from scratch",
              file=sys.stderr)
    return run_train(cfg, overwrite=True, task_examples=task_examples, prepared=prepared)


def partial_differs(cfg: RunConfig, mix: Mix, partial: Path) -> str:
    """Return what differs between cfg + mix and the interrupted run in `partial` ('' when nothing does)."""
    try:
        saved = yaml.safe_load((partial / "config.yaml").read_text(encoding="utf-8")) or {}
        saved_mix = (partial / "mix.jsonl").read_text(encoding="utf-8")
        saved_manifest = (partial / "manifest.json").read_text(encoding="utf-8")
    except (OSError, ValueError, yaml.YAMLError):
        return "state (its config or mix is unreadable)"
    now = config_dict(cfg)
    missing, registered = object(), added_later()  # a setting the saved config predates: its unset value
    keys = [f"{section}.{name}" for section in RESUME_SECTIONS for name in now[section]
            if f"{section}.{name}" not in RESUME_IGNORED and saved.get(section, {}).get(
                name, registered.get(f"{section}.{name}", missing)) != now[section][name]]
    if keys:
        return "config (" + ", ".join(keys) + ")"
    if saved_mix != "".join(mix_lines(mix)) or saved_manifest != json.dumps(mix.manifest, indent=1) + "\n":
        return "mix (mix.jsonl or manifest.json)"
    device = pick_device(cfg.model)
    now_compute = {"dtype": dtype_name(autocast_dtype(cfg.model, device)), "device": device.type}
    if (was := checkpoint_compute(partial)) and was != now_compute:  # e.g. dtype auto: fp32 on a CPU, bf16 on a GPU
        return f"compute path (it ran {was['dtype']} on {was['device']}, here {now_compute['dtype']} on {device.type})"
    return ""
