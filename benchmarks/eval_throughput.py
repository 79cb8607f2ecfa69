"""Benchmark: `tell eval` vs a per-example generate loop on the same Halu-CoT-JSON prompts (greedy).

- ``loop``: what the paper's eval scripts do — one prompt at a time, fp32, ``model.generate`` with its KV
  cache, stop at EOS.
- ``tell``: ``tell.evaluate.evaluate`` as ``tell eval --greedy`` runs it on a CPU (fp32 on every CPU kind:
  packed prefill, shared-prefix KV cache, length-grouped batches) — the same numerics as ``loop``, so
  ``speedup`` is at equal precision and ``outputs_match_fraction`` shows that batching changes no answer.
- Only where the CPU computes bf16 natively (avx512_bf16 or AMX): ``tell_bf16`` (``--dtype bf16``, the
  opt-in fast path there) and ``loop_bf16`` (the loop with bf16 weights), for the speedup at equal bf16
  precision. Elsewhere bf16 is emulated (~1 GFLOP/s) and these parts are skipped (their keys are null).

Each part runs in its own subprocess (its own peak RSS) and saves its outputs under ``--out``; a part
already saved there is reused, so a long run can be split: ``--parts loop`` then ``--parts tell``.
Prints one JSON object once every part is there, with the CPU kind (flags avx2, avx512f, avx512_bf16, amx_bf16).

    python benchmarks/eval_throughput.py --quick    # 16 prompts
    python benchmarks/eval_throughput.py            # 64 prompts (the fp32 loop takes most of the time)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import cpu_kind, peak_rss_gib  # noqa: E402  (one definition of each for both benchmarks)

PARTS = ("loop", "tell", "tell_bf16", "loop_bf16")
BF16_PARTS = ("tell_bf16", "loop_bf16")


def test_rows(n: int):
    from tell.tasks import TASKS
    task = TASKS["halu-cot-json"]()
    return task, task.test_rows(n, 0)


def worker(part: str, n: int, max_new_tokens: int, model_name: str = "default") -> dict:
    import torch
    from tell.config import GenerateConfig, ModelConfig
    from tell.evaluate import evaluate
    from tell.generate import load_for_generation, prompt_texts
    task, rows = test_rows(n)
    cfg = GenerateConfig(greedy=True, max_new_tokens=max_new_tokens)
    if part in ("loop", "loop_bf16"):
        dtype = "fp32" if part == "loop" else "bf16"
        run = load_for_generation(None, ModelConfig(name=model_name, device="cpu", dtype=dtype))
        model, tokenizer = run.model, run.tokenizer
        texts = prompt_texts(run, [r.messages for r in rows])
        outputs, start = [], time.perf_counter()
        with torch.inference_mode():
            for text in texts:  # as the paper's scripts: one example per generate call
                ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
                out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     repetition_penalty=cfg.repetition_penalty,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                outputs.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        wall = time.perf_counter() - start
        metrics = task.score(outputs, [r.reference for r in rows])
        new_tokens = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
    else:
        run = load_for_generation(None, ModelConfig(name=model_name, device="cpu",
                                                     dtype="bf16" if part == "tell_bf16" else "auto"))
        result = evaluate(run, task, rows, cfg, progress=False)
        outputs = [r["output"] for r in result.rows]
        metrics, wall, new_tokens = result.metrics, result.metrics["generate_wall_s"], result.metrics["new_tokens"]
    headline = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"part": part, "prompts": len(rows), "dtype": str(next(run.model.parameters()).dtype),
            "wall_s": round(wall, 2), "new_tokens": new_tokens, "new_tokens_per_s": round(new_tokens / wall, 2),
            "peak_rss_gib": peak_rss_gib(), "metrics": headline, "outputs": outputs}


def match(a: list[str], b: list[str]) -> float:
    return round(sum(x == y for x, y in zip(a, b)) / len(a), 3)


def metric_gap(a: dict, b: dict) -> float:
    """Return the largest difference, in points (0-100), between two runs' shared headline metrics."""
    # rates only: counts (n, n_adherent, skipped_too_long) are ints, and a count of 0 vs 1 is not 100 points
    keys = [k for k in a if k in b and all(isinstance(r[k], float) and 0 <= r[k] <= 1 for r in (a, b))]
    return round(max((abs(a[k] - b[k]) * 100 for k in keys), default=0.0), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=192, help="the task's budget")
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts to run now (others are read from --out)")
    parser.add_argument("--out", default="runs/bench-eval", help="folder for each part's saved results")
    parser.add_argument("--model", default="default",
                        help="the model of every part (default: the embedded SmolLM2-135M-Instruct; random weights of "
                             "its shape never stop at EOS, so every answer runs to --max-new-tokens)")
    parser.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.prompts = 16
    if args.worker:
        print(json.dumps(worker(args.worker, args.prompts, args.max_new_tokens, args.model)))
        return
    cpu = cpu_kind()
    wanted = [p for p in PARTS if cpu["native_bf16"] or p not in BF16_PARTS]  # emulated bf16 would take hours
    # another model's saved parts are never reused for this one
    tag = "" if args.model == "default" else "-" + "".join(c if c.isalnum() else "_" for c in args.model)
    out = Path(args.out) / f"p{args.prompts}-t{args.max_new_tokens}{tag}"
    out.mkdir(parents=True, exist_ok=True)
    for part in [p for p in args.parts.split(",") if p in wanted]:
        proc = subprocess.run([sys.executable, __file__, "--worker", part, "--prompts", str(args.prompts),
                               "--max-new-tokens", str(args.max_new_tokens), "--model", args.model],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"part {part} failed:\n{proc.stderr[-3000:]}")
        (out / f"{part}.json").write_text(proc.stdout.strip().splitlines()[-1] + "\n")
    missing = [p for p in wanted if not (out / f"{p}.json").is_file()]
    if missing:
        print(json.dumps({"benchmark": "eval_throughput", "waiting_for_parts": missing, "out": str(out)}))
        return
    print(json.dumps(summary(args, cpu, {p: json.loads((out / f"{p}.json").read_text()) for p in wanted})))


def summary(args, cpu: dict, runs: dict) -> dict:
    """Return the benchmark's JSON: speedups, identical-output fractions and metric gaps between the parts."""
    loop, tell = runs["loop"], runs["tell"]
    tell16, loop16 = runs.get("tell_bf16"), runs.get("loop_bf16")

    def bf16(value):  # a bf16 comparison, or None where bf16 is not native (its parts were not run)
        return value() if tell16 and loop16 else None
    return {
        "benchmark": "eval_throughput", "model": args.model, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "cpu": cpu, "dtype": tell["dtype"],
        "tell_new_tokens_per_s": tell["new_tokens_per_s"], "loop_new_tokens_per_s": loop["new_tokens_per_s"],
        "speedup": round(tell["new_tokens_per_s"] / loop["new_tokens_per_s"], 2),
        "speedup_wall": round(loop["wall_s"] / tell["wall_s"], 2),
        "tell_wall_s": tell["wall_s"], "loop_wall_s": loop["wall_s"],
        # batching alone: the default path and the loop compute in the same dtype (fp32 on a CPU)
        "outputs_match_fraction": match(tell["outputs"], loop["outputs"]),
        "metrics_gap_points": metric_gap(tell["metrics"], loop["metrics"]),
        # kept for scripts that read them: the default CPU path is the fp32 path now
        "tell_fp32_new_tokens_per_s": tell["new_tokens_per_s"],
        "tell_fp32_speedup": round(tell["new_tokens_per_s"] / loop["new_tokens_per_s"], 2),
        # the opt-in bf16 path (native-bf16 CPUs only) vs the fp32 loop, and vs the same loop in bf16
        "bf16_new_tokens_per_s": bf16(lambda: tell16["new_tokens_per_s"]),
        "bf16_outputs_match_fraction": bf16(lambda: match(tell16["outputs"], loop["outputs"])),
        "bf16_metrics_gap_points": bf16(lambda: metric_gap(tell16["metrics"], loop["metrics"])),
        "loop_bf16_new_tokens_per_s": bf16(lambda: loop16["new_tokens_per_s"]),
        "speedup_vs_bf16_loop": bf16(lambda: round(tell16["new_tokens_per_s"] / loop16["new_tokens_per_s"], 2)),
        "speedup_wall_vs_bf16_loop": bf16(lambda: round(loop16["wall_s"] / tell16["wall_s"], 2)),
        "bf16_vs_bf16_loop_outputs_match_fraction": bf16(lambda: match(tell16["outputs"], loop16["outputs"])),
        "bf16_vs_bf16_loop_metrics_gap_points": bf16(lambda: metric_gap(tell16["metrics"], loop16["metrics"])),
        "peak_rss_gib": tell["peak_rss_gib"], "loop_peak_rss_gib": loop["peak_rss_gib"],
        "tell_bf16_peak_rss_gib": bf16(lambda: tell16["peak_rss_gib"]),
        "loop_bf16_peak_rss_gib": bf16(lambda: loop16["peak_rss_gib"]),
        "metrics": {p: r["metrics"] for p, r in runs.items()},
        "new_tokens": {p: r["new_tokens"] for p, r in runs.items()},
    }


if __name__ == "__main__":
    main()
