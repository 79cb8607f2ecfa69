"""Benchmark: embedding HaluEval rows for `tell select` with the embedded model (SmolLM2-135M-Instruct).

Builds the Halu-CoT-JSON prompt of the first --rows rows of the shipped HaluEval file (4,007 rows; the task's
training pool is the 3,000 of them whose query is not in a test prompt), renders it with the model's chat
template as `tell select` does, and times ``embed.hidden_states`` (batched by length, the shared instruction
prefix computed once). ``--plain N`` also times the first N rows without the shared prefix, on the same rows
as the prefixed path, for the speed-up. FLOPs: 2 x the non-embedding parameters per computed token (no LM
head) plus attention (QK and AV: 4 x keys x hidden per token and layer). Prints one JSON object.

    python benchmarks/select_speed.py --rows 4007          # all rows (~20 min on 2 avx2-only cores)
    python benchmarks/select_speed.py --rows 256 --plain 64
"""
from __future__ import annotations

import argparse
import json
import time


def halu_texts(rows: int, tokenizer) -> list[str]:
    from tell.data import read_records
    from tell.mix import render_prompt
    from tell.tasks import HALU_POOL_FILE, halu_prompt
    records = read_records(HALU_POOL_FILE)[:rows]
    return [render_prompt(tokenizer, ({"role": "user", "content": halu_prompt(r["user_query"], r["chatgpt_response"])},))
            for _, r in records]


def flops(model, lengths: list[int], prefix: int) -> float:
    """Return the forward FLOPs of the tokens computed: each row's own tokens, plus the prefix once."""
    config = model.config
    params = sum(p.numel() for name, p in model.base_model.named_parameters() if "embed_tokens" not in name)
    width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    own = [n - prefix for n in lengths]
    keys = sum(prefix * n + n * (n + 1) / 2 for n in own) + prefix * (prefix + 1) / 2
    return 2.0 * params * (sum(own) + prefix) + 4.0 * width * keys * config.num_hidden_layers


def timed(model, tokenizer, texts, batch_size: int, share_prefix: bool = True) -> float:
    from tell import embed
    if not share_prefix:
        embed.MIN_PREFIX_TOKENS = 10**9
    start = time.perf_counter()
    embed.hidden_states(model, tokenizer, texts, -1, "mean", batch_size, progress=True)
    seconds = time.perf_counter() - start
    embed.MIN_PREFIX_TOKENS = 16
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4007)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="as `tell select --dtype` (auto: fp32 on a CPU; bf16 is the opt-in fast path where "
                             "the CPU has avx512_bf16 or AMX)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default: this benchmark times the CPU, also on a machine with a GPU), cuda or auto")
    parser.add_argument("--model", default="default",
                        help="as `tell select --model` (a directory of the embedded model's shape with random weights "
                             "embeds at the same speed)")
    parser.add_argument("--plain", type=int, default=0, help="also time this many rows without the shared prefix")
    args = parser.parse_args()
    import torch
    from tell.config import ModelConfig
    from tell.generate import common_prefix_length, load_for_generation
    from tell.hardware import cpu_label, machine
    run = load_for_generation(None, ModelConfig(name=args.model, dtype=args.dtype, device=args.device))
    texts = halu_texts(args.rows, run.tokenizer)
    encoded = [run.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    lengths, prefix = [len(e) for e in encoded], common_prefix_length(encoded)
    seconds = timed(run.model, run.tokenizer, texts, args.batch_size)
    weight = next(run.model.parameters())
    total = flops(run.model, lengths, prefix)
    result = {"model": args.model, "rows": len(texts), "prompt_tokens": sum(lengths), "shared_prefix_tokens": prefix,
              "computed_tokens": sum(lengths) - prefix * (len(texts) - 1), "batch_size": args.batch_size,
              "seconds": round(seconds, 1), "rows_per_s": round(len(texts) / seconds, 2),
              "computed_tok_per_s": round((sum(lengths) - prefix * (len(texts) - 1)) / seconds, 1),
              "gflop": round(total / 1e9, 1), "gflop_per_s": round(total / 1e9 / seconds, 1),
              "projected_s_4007_rows": round(seconds * 4007 / len(texts)),
              "dtype": str(weight.dtype), "device": str(weight.device),
              "threads": torch.get_num_threads(),
              "cpu": machine("cpu")["cpu"], "cpu_kind": cpu_label()}
    if args.plain:
        subset = texts[:args.plain]
        plain = timed(run.model, run.tokenizer, subset, args.batch_size, share_prefix=False)
        prefixed = timed(run.model, run.tokenizer, subset, args.batch_size)
        result.update(plain_rows=len(subset), plain_s=round(plain, 1), prefixed_s_same_rows=round(prefixed, 1),
                      prefix_speedup=round(plain / prefixed, 2),
                      plain_gflop_per_s=round(flops(run.model, lengths[:args.plain], 0) / 1e9 / plain, 1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
