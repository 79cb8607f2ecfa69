"""Where the time goes on this CPU: op profiles of tell's bf16 training and generation, and the cost of
oneDNN's per-shape kernel creation (bf16 F.linear, M fixed vs a new M every call). argv: mode model."""
import argparse, json, sys, time, tempfile, warnings
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
sys.path.insert(0, "benchmarks")
import os
mode, model_dir = sys.argv[1], sys.argv[2]
DT = os.environ.get("PROF_DTYPE", "bf16"); STEPS = int(os.environ.get("PROF_STEPS", "3")); NROWS = int(os.environ.get("PROF_ROWS", "16")); NEW = int(os.environ.get("PROF_NEW", "64"))
torch.set_num_threads(2)


def table(p, n=28):
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=n, max_name_column_width=48)


if mode == "train":
    import train_throughput as tt
    from tell.config import ModelConfig, TrainConfig
    from tell.model import autocast_dtype, load_model, pick_device
    from tell.train import train_lora
    cfg_model = ModelConfig(name=model_dir, device="cpu", dtype=DT)
    for mbt in (768, 1536):
        model, tok = load_model(cfg_model)
        mix = tt.build_mix(4, "3", tok)
        cfg = TrainConfig(max_steps=STEPS, micro_batch_tokens=mbt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(activities=[ProfilerActivity.CPU]) as p:
                _, r = train_lora(model, tok, mix, cfg, tempfile.mkdtemp(), autocast_dtype(cfg_model, pick_device(cfg_model)))
        print(f"== train mbt {mbt}: {r.tokens_per_s} tok/s over {r.optimizer_steps} steps, {r.trained_tokens} tokens, "
              f"wall {r.wall_s} s (profiled)")
        print(table(p))
elif mode == "eval":
    from tell.config import GenerateConfig, ModelConfig
    from tell.evaluate import evaluate
    from tell.generate import load_for_generation
    from tell.tasks import TASKS
    task = TASKS["halu-cot-json"]()
    rows = task.test_rows(NROWS, 0)
    for dtype in (DT, "fp32"):
        run = load_for_generation(None, ModelConfig(name=model_dir, device="cpu", dtype=dtype))
        cfg = GenerateConfig(greedy=True, max_new_tokens=NEW)
        evaluate(run, task, rows[:4], GenerateConfig(greedy=True, max_new_tokens=8), progress=False)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            res = evaluate(run, task, rows, cfg, progress=False)
        m = res.metrics
        print(f"== eval {dtype}: {m['new_tokens']} new tokens in {m['generate_wall_s']} s (profiled)")
        print(table(p))
elif mode == "jit":
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(1536, 576, dtype=dtype)
        res = {}
        for label, ms in (("fixed_M", [700] * 60), ("new_M_each_call", list(range(600, 660))),
                          ("M_multiple_of_64", [640, 704, 768] * 20)):
            xs = [torch.randn(m, 576, dtype=dtype, requires_grad=True) for m in ms]
            F.linear(torch.randn(700, 576, dtype=dtype), w)
            start = time.perf_counter()
            for x in xs:
                y = F.linear(x, w)
                y.sum().backward()
            res[label] = round((time.perf_counter() - start) / len(xs) * 1e3, 3)
        print(json.dumps({"dtype": str(dtype), "ms_per_fwd_bwd": res}))
