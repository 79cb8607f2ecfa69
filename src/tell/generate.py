"""Stage 6 — generate: batched answers from a base model or a trained run.

In: a model (optionally a run directory: base + adapter + the run's anchor), prompt message lists and a
GenerateConfig. Out: the raw answer texts, in input order. Prompts are grouped by length into batches and
left-padded, decoding uses the KV cache and stops at EOS.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from tell.anchor import anchored_messages
from tell.config import GenerateConfig, ModelConfig, RunConfig, config_from_dict
from tell.data import TellInputError
from tell.mix import render_prompt
from tell.model import autocast_dtype, load_model, pick_device


@dataclass(frozen=True)
class LoadedRun:
    """A model ready for generation and the anchor its task prompts must carry."""

    model: object
    tokenizer: object
    anchor: str
    placement: str
    config: RunConfig | None


def load_run_config(run_dir: str | Path) -> RunConfig:
    """Return the resolved config a finished run wrote, or raise if the run is incomplete."""
    run_dir = Path(run_dir)
    if not all((run_dir / name).exists() for name in ("config.yaml", "adapter", "anchor.txt")):
        raise TellInputError("not a finished tell run (config.yaml, anchor.txt and adapter/ expected)", run_dir)
    return config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")))


def load_for_generation(run_dir: str | Path | None = None, model_cfg: ModelConfig | None = None) -> LoadedRun:
    """Return base + adapter of a run (with the run's anchor), or a plain model when no run is given."""
    if run_dir is None:
        model_cfg = model_cfg or ModelConfig()
        model, tokenizer = load_model(model_cfg)
        return LoadedRun(_for_inference(model, model_cfg), tokenizer, "", "user-prefix", None)
    from peft import PeftModel
    cfg = load_run_config(run_dir)
    anchor = (Path(run_dir) / "anchor.txt").read_text(encoding="utf-8")
    if model_cfg is not None:  # the caller may change dtype/device, never the base model
        cfg.model.dtype, cfg.model.device = model_cfg.dtype, model_cfg.device
    model, tokenizer = load_model(cfg.model)
    model = PeftModel.from_pretrained(model, str(Path(run_dir) / "adapter")).merge_and_unload()
    return LoadedRun(_for_inference(model, cfg.model), tokenizer, anchor, cfg.anchor.placement, cfg)


def _for_inference(model, cfg: ModelConfig):
    """Return the model in eval mode, cast to bf16 where the hardware has it (dtype auto).

    Measured on the 2-core CPU: bf16 prefill 3.4x and decode 1.8x faster than fp32 at batch 16.
    Greedy outputs can differ from fp32 in near-ties; `--dtype fp32` keeps full precision.
    """
    dtype = autocast_dtype(cfg, pick_device(cfg))
    return (model.to(dtype) if dtype is not None else model).eval()


def prompt_texts(run: LoadedRun, prompts: list[tuple[dict, ...]], use_anchor: bool = True) -> list[str]:
    """Return chat-rendered prompt texts, with the run's anchor applied to each."""
    anchor = run.anchor if use_anchor else ""
    return [render_prompt(run.tokenizer, anchored_messages(p, anchor, run.placement)) for p in prompts]


def sampling_kwargs(cfg: GenerateConfig) -> dict:
    if cfg.greedy:
        return {"do_sample": False, "repetition_penalty": cfg.repetition_penalty}
    return {"do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
            "repetition_penalty": cfg.repetition_penalty}


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Return index batches of similar prompt length (longest first, so memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def generate_texts(model, tokenizer, texts: list[str], cfg: GenerateConfig, max_new_tokens: int,
                   progress: bool = True) -> list[str]:
    """Return the model's answer to each rendered prompt text, in input order."""
    from tqdm.auto import tqdm
    device = next(model.parameters()).device
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    outputs = [""] * len(texts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = length_batches([len(e) for e in encoded], cfg.batch_size)
    bar = tqdm(total=len(texts), desc="generate", unit="prompt", disable=not progress, dynamic_ncols=True)
    new_tokens = 0
    for number, batch in enumerate(batches):
        torch.manual_seed(cfg.seed + number)  # per batch, so a batch's samples do not depend on earlier ones
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id, **sampling_kwargs(cfg))
        for row, i in enumerate(batch):
            answer = generated[row, width:]
            new_tokens += int((answer != pad_id).sum())
            outputs[i] = tokenizer.decode(answer, skip_special_tokens=True)
        bar.update(len(batch))
        bar.set_postfix(new_tok=new_tokens)
    bar.close()
    return outputs
