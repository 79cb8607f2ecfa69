"""Paired timing: held-out general loss, padded full-logit batches (before) vs packed labelled-only (now)."""
import json, math, time, sys
import torch
from tell.config import RunConfig, ModelConfig
from tell.experiment import heldout_general
from tell.generate import load_for_generation
from tell.evaluate import general_loss
from tell.mix import encode_examples
from tell.model import context_length
from tell.packing import IGNORE, Row, collate

def old_loss(model, tokenizer, examples, max_batch_tokens=1024):
    device = next(model.parameters()).device
    encoded = encode_examples(tokenizer, examples)
    limit = context_length(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count, batch = 0.0, 0, []
    for enc in sorted(encoded, key=lambda e: len(e.input_ids)) + [None]:
        if enc is not None and (not batch or len(enc.input_ids[:limit]) * (len(batch) + 1) <= max_batch_tokens):
            batch.append(enc); continue
        rows = [Row(e.input_ids[:limit], e.prompt_tokens, "general") for e in batch]
        inputs = collate(rows, pad_id, device)
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits[:, :-1]
        targets = inputs["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum")
        total, count, batch = total + float(losses), count + int((targets != IGNORE).sum()), [enc]
    return total / count, count

cfg = RunConfig()
rows = heldout_general(cfg)
run = load_for_generation(None, ModelConfig())
tokens = sum(len(e.input_ids) for e in encode_examples(run.tokenizer, rows))
out = {"rows": len(rows), "tokens": tokens}
for rep in range(2):
    t = time.perf_counter(); o = old_loss(run.model, run.tokenizer, rows); out[f"old_s_{rep}"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter(); n = general_loss(run.model, run.tokenizer, rows); out[f"new_s_{rep}"] = round(time.perf_counter() - t, 1)
out.update(old_loss=round(o[0], 5), new_loss=n["general_loss"], old_tokens=o[1], new_tokens=n["general_loss_tokens"])
print(json.dumps(out))
