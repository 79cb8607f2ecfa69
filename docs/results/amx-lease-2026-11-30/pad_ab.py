"""A/B of padding packed micro-batches to a multiple of 64 tokens: tell's training step, bf16, on this CPU.
argv: model multiple [dtype] [steps]."""
import argparse, json, sys
sys.path.insert(0, "benchmarks")
import train_throughput as tt
from tell import packing
model, mult = sys.argv[1], int(sys.argv[2])
dtype = sys.argv[3] if len(sys.argv) > 3 else "bf16"
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 6
packing.PACK_MULTIPLE[dtype] = mult
args = argparse.Namespace(model=model, task_rows=16, ratio="3", max_steps=steps, micro_batch_tokens=768, dtype=dtype,
                          worker="tell")
r = tt.worker_tell(args)
print(json.dumps({"multiple": mult, **{k: r[k] for k in ("steps", "real_tokens", "wall_s", "tokens_per_s",
                                                          "final_loss")}}))
