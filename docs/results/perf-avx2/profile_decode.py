"""Profile of batched generation: `python docs/results/perf-avx2/profile_decode.py N NEW` (N Halu test prompts in one
batch, greedy, NEW new tokens); prints wall time and the top ops by self CPU time."""
import sys, time, torch
from torch.profiler import profile, ProfilerActivity
from tell.config import GenerateConfig, ModelConfig
from tell.generate import load_for_generation, prompt_texts, generate_texts
from tell.tasks import TASKS
n, new = int(sys.argv[1]), int(sys.argv[2])
task = TASKS["halu-cot-json"](); rows = task.test_rows(n, 0)
run = load_for_generation(None, ModelConfig(device="cpu", dtype="fp32"))
texts = prompt_texts(run, [r.messages for r in rows])
cfg = GenerateConfig(greedy=True, batch_size=n, max_new_tokens=new)
generate_texts(run.model, run.tokenizer, texts[:2], cfg, 4, progress=False)  # warm-up
t = time.perf_counter()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    out = generate_texts(run.model, run.tokenizer, texts, cfg, new, progress=False)
wall = time.perf_counter() - t
toks = sum(len(run.tokenizer(o)["input_ids"]) for o in out)
print(f"wall {wall:.1f} s, ~{toks} new tokens, {toks/wall:.1f} tok/s")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
