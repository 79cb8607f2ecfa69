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

from tell.anchor import anchored_messages, check_placement
from tell.config import GenerateConfig, ModelConfig, RunConfig, config_from_dict
from tell.data import TellInputError
from tell.mix import render_prompt
from tell.cpu_decode import cached_attention, new_cache, packed_prefill, packs, switches_attention
from tell.hardware import dtype_name, machine
from tell.model import load_model, quiet_peft, resolve_model_path
from tell.vllm_backend import check_vllm, vllm_imports


@dataclass(frozen=True)
class LoadedRun:
    """A model ready for generation and the anchor its task prompts must carry."""

    model: object
    tokenizer: object
    anchor: str
    placement: str
    config: RunConfig | None
    model_path: str = ""
    """Base model directory/id (what the vLLM backend loads)."""
    adapter_dir: str = ""
    """The run's adapter directory, empty for a plain model."""
    model_cfg: ModelConfig | None = None
    """A plain model's settings (a run's are config.model): what the vLLM backend loads it with."""


def load_run_config(run_dir: str | Path) -> RunConfig:
    """Return the resolved config a finished run wrote, or raise if the run is incomplete."""
    run_dir = Path(run_dir)
    if not all((run_dir / name).exists() for name in ("config.yaml", "adapter", "anchor.txt")):
        raise TellInputError("not a finished tell run (config.yaml, anchor.txt and adapter/ expected)", run_dir)
    return config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")))


def load_for_generation(run_dir: str | Path | None = None, model_cfg: ModelConfig | None = None,
                        backend: str = "transformers") -> LoadedRun:
    """Return base + adapter of a run (with the run's anchor), or a plain model when no run is given.

    With backend 'vllm' no weights are loaded here (vLLM loads them); only the tokenizer and paths.
    """
    if backend == "vllm":
        return _paths_only(run_dir, model_cfg)
    if run_dir is None:
        model_cfg = model_cfg or ModelConfig()
        model, tokenizer = load_model(model_cfg)
        return LoadedRun(model, tokenizer, "", "user-prefix", None, str(resolve_model_path(model_cfg.name)))
    from peft import PeftModel
    cfg, anchor = _run_settings(run_dir, model_cfg)
    model, tokenizer = load_model(cfg.model)
    adapter = str(Path(run_dir) / "adapter")
    # safe_merge writes each merged weight into a new tensor: a base shared across compare arms keeps its own
    with quiet_peft():
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload(safe_merge=True).eval()
    return LoadedRun(model, tokenizer, anchor, cfg.anchor.placement, cfg, str(resolve_model_path(cfg.model.name)),
                     adapter)


def _run_settings(run_dir, model_cfg: ModelConfig | None) -> tuple[RunConfig, str]:
    """Return a finished run's config, with the dtype/device of `model_cfg` when given (the caller may change
    those, never the base model), and its anchor text."""
    cfg = load_run_config(run_dir)
    if model_cfg is not None:
        cfg.model.dtype, cfg.model.device = model_cfg.dtype, model_cfg.device
    return cfg, (Path(run_dir) / "anchor.txt").read_text(encoding="utf-8")


def _paths_only(run_dir, model_cfg: ModelConfig | None) -> LoadedRun:
    from tell.model import load_tokenizer
    check_vllm()
    if run_dir is None:
        model_cfg = model_cfg or ModelConfig()
        return LoadedRun(None, load_tokenizer(model_cfg.name), "", "user-prefix", None,
                         str(resolve_model_path(model_cfg.name)), model_cfg=model_cfg)
    cfg, anchor = _run_settings(run_dir, model_cfg)
    return LoadedRun(None, load_tokenizer(cfg.model.name), anchor, cfg.anchor.placement, cfg,
                     str(resolve_model_path(cfg.model.name)), str(Path(run_dir) / "adapter"))


def usable_backend(name: str) -> str:
    """Return the backend to generate with: `name`, or 'transformers' (said on stderr) when 'vllm' is asked
    for and does not import here. Both give the same metrics; vLLM is only faster on a GPU."""
    if name != "vllm" or vllm_imports():
        return name
    import sys
    print("[tell] --backend vllm: the 'vllm' package does not import on this machine (it needs a GPU: "
          "pip install vllm); generating with the transformers backend instead", file=sys.stderr, flush=True)
    return "transformers"


def generation_path(run: LoadedRun, cfg: GenerateConfig) -> dict:
    """Return what generation computes with: machine (CPU kind, threads), dtype, prefill and decode kernels."""
    if run.model is None:  # vLLM: its own kernels
        return {"backend": cfg.backend, "batch_size": cfg.batch_size}
    model = run.model
    device = next(model.parameters()).device
    rerouted = switches_attention(model) and model.config._attn_implementation == "sdpa"
    return {**machine(device), "backend": cfg.backend, "dtype": dtype_name(next(model.parameters()).dtype),
            "batch_size": cfg.batch_size,
            "prefill": "packed rows, shared prefix once (cpu_decode.packed_prefill)" if packs(model)
            else f"padded batch, the model's {model.config._attn_implementation} attention",
            "decode": "cached matmul attention over a growing KV buffer (cpu_decode)" if rerouted
            else f"the model's {model.config._attn_implementation} attention"}


def prompt_texts(run: LoadedRun, prompts: list[tuple[dict, ...]], use_anchor: bool = True) -> list[str]:
    """Return chat-rendered prompt texts, with the run's anchor applied to each."""
    anchor = run.anchor if use_anchor else ""
    if anchor:
        check_placement(run.tokenizer, run.placement, run.model_path)
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


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerateConfig) -> torch.Tensor:
    """Return one token per row: repetition penalty, then greedy, or temperature → top-k → top-p sampling.

    Same distribution as transformers' processors in the same order, but sampling runs over the k
    candidates instead of the whole vocabulary (torch.multinomial over 49k entries cost 19 ms a step).
    """
    if cfg.repetition_penalty != 1.0:
        score = logits.gather(1, seen)
        score = torch.where(score < 0, score * cfg.repetition_penalty, score / cfg.repetition_penalty)
        logits = logits.scatter(1, seen, score)
    if cfg.greedy:
        return logits.argmax(-1)
    values, indices = torch.topk(logits / cfg.temperature, min(cfg.top_k or logits.shape[-1], logits.shape[-1]))
    probs = values.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass ranked above each candidate
    probs = probs.masked_fill(before >= cfg.top_p, 0.0)
    probs[:, 0] = probs[:, 0].clamp_min(1e-12)  # the top candidate always survives, as in transformers
    choice = torch.multinomial(probs, 1)
    return indices.gather(1, choice).squeeze(1)


@dataclass
class SharedPrefix:
    """The KV cache of the token prefix that every prompt starts with, computed once per call."""

    length: int
    cache: object
    ids: torch.Tensor
    """(1, length) token ids of the prefix (the repetition penalty counts them, as transformers does)."""


def common_prefix_length(encoded: list[list[int]]) -> int:
    """Return the length of the token prefix all rows share, leaving every row at least one token of its own."""
    first, length = encoded[0], min(len(e) for e in encoded) - 1
    for e in encoded[1:]:
        length = min(length, next((i for i, (a, b) in enumerate(zip(first, e)) if a != b), length))
    return max(length, 0)


def shared_prefix(model, encoded: list[list[int]], device, min_tokens: int = 32) -> SharedPrefix | None:
    """Return the cache of the prompts' longest common token prefix, or None when it is short.

    Built-in task prompts share long instructions (Halu-CoT-JSON: ~300 of ~600 tokens), so this halves
    the prefill. At least one token of every prompt stays outside the prefix (its logits start decoding).
    """
    length = common_prefix_length(encoded)
    if length < min_tokens:
        return None
    ids = torch.tensor([encoded[0][:length]], device=device)
    out = model(input_ids=ids, cache=new_cache(model), use_cache=True, logits_to_keep=1)
    return SharedPrefix(length, out.cache, ids)


def _prefill(model, ids, mask, prefix: SharedPrefix | None):
    """Return (cache, last-position logits, attention mask over cache + ids) after reading the prompts.

    On CPU the rows are read packed, without their padding (cpu_decode.py); elsewhere left-padded."""
    if packs(model):
        rows = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
        return packed_prefill(model, rows, prefix)
    if prefix is None:
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: positions count real tokens only
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=new_cache(model),
                    use_cache=True, logits_to_keep=1)
        return out.cache, out.logits[:, -1].float(), mask
    import copy
    cache = copy.deepcopy(prefix.cache)
    cache.batch_repeat_interleave(ids.shape[0])
    # Padding now sits between the shared prefix and each row's own tokens; the mask hides it.
    positions = prefix.length + (mask.cumsum(-1) - 1).clamp_min(0)
    full_mask = torch.cat([torch.ones((ids.shape[0], prefix.length), dtype=mask.dtype, device=mask.device), mask], 1)
    out = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1].float(), full_mask


def decode_batch(model, ids: torch.Tensor, mask: torch.Tensor, cfg: GenerateConfig, max_new_tokens: int,
                 eos_id: "int | tuple[int, ...]", prefix: "SharedPrefix | None" = None) -> list[list[int]]:
    """Return the new token ids of each left-padded row (the stop token included when reached); `eos_id` is
    one stop id or several (see stop_token_ids).

    With `prefix`, `ids` hold only what follows the prompts' shared prefix, whose KV cache is reused.

    One prefill (logits only at the last position), then one token per step with the KV cache; a row that
    reaches EOS leaves the batch and its cache, so finished rows cost nothing while others go on.
    """
    # The repetition penalty reads each row's own tokens, never its padding (a pad id is often EOS: a padded row
    # would stop later than alone). Left padding: a row's last token is real, so pads count as that one.
    own = torch.where(mask.bool(), ids, ids[:, -1:])
    cache, logits, mask = _prefill(model, ids, mask, prefix)
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=ids.device)
    alive = torch.arange(ids.shape[0], device=ids.device)
    seen = own if prefix is None else torch.cat([prefix.ids.expand(ids.shape[0], -1), own], 1)
    answers = [[] for _ in range(ids.shape[0])]
    for step in range(max_new_tokens):
        chosen = next_tokens(logits, seen, cfg)
        for row, token in zip(alive.tolist(), chosen.tolist()):
            answers[row].append(token)
        keep = (~torch.isin(chosen, stops)).nonzero().squeeze(1)
        if step == max_new_tokens - 1 or keep.numel() == 0:
            break
        if keep.numel() < alive.numel():
            cache.batch_select_indices(keep)
            alive, chosen, seen, mask = alive[keep], chosen[keep], seen[keep], mask[keep]
        seen = torch.cat([seen, chosen[:, None]], dim=1)
        positions = mask.sum(-1, keepdim=True)  # left padding: a row's next position is its token count
        mask = torch.cat([mask, torch.ones_like(chosen)[:, None]], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                    cache=cache, use_cache=True)
        logits = out.logits[:, -1].float()
    return answers


def stop_token_ids(model_or_path, tokenizer) -> tuple[int, ...]:
    """Return the ids that end an answer: the model's generation_config eos_token_id (one id or a list:
    Llama-3 `<|eot_id|>`, Qwen `<|im_end|>`, Gemma `<end_of_turn>`) and the tokenizer's EOS — the set vLLM
    stops on too. `model_or_path` is a loaded model or a model directory/id (read for vLLM)."""
    config = getattr(model_or_path, "generation_config", None)
    if config is None and model_or_path is not None and not hasattr(model_or_path, "config"):
        from transformers import GenerationConfig
        try:
            config = GenerationConfig.from_pretrained(model_or_path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            config = None
    ids = getattr(config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(sorted(set(ids)))


@torch.inference_mode()
def generate_texts(model, tokenizer, texts: list[str], cfg: GenerateConfig, max_new_tokens: int,
                   progress: bool = True) -> list[str]:
    """Return the model's answer to each rendered prompt text, in input order."""
    with cached_attention(model):
        return _generate_texts(model, tokenizer, texts, cfg, max_new_tokens, progress)


def _generate_texts(model, tokenizer, texts, cfg, max_new_tokens, progress):
    from tqdm.auto import tqdm
    device = next(model.parameters()).device
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    outputs = [""] * len(texts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = length_batches([len(e) for e in encoded], cfg.batch_size)
    stops = stop_token_ids(model, tokenizer)
    prefix = shared_prefix(model, encoded, device) if len(encoded) > 1 else None
    if prefix is not None:
        encoded = [e[prefix.length:] for e in encoded]
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
        answers = decode_batch(model, ids.to(device), mask.to(device), cfg, max_new_tokens, stops, prefix)
        for row, i in enumerate(batch):
            new_tokens += len(answers[row])
            answer = answers[row][:-1] if answers[row] and answers[row][-1] in stops else answers[row]
            outputs[i] = tokenizer.decode(answer, skip_special_tokens=True)
        bar.update(len(batch))
        bar.set_postfix(new_tok=new_tokens)
    bar.close()
    return outputs


def vllm_texts(run: LoadedRun, texts: list[str], cfg: GenerateConfig, max_new_tokens: int) -> list[str]:
    """Return answers generated by vLLM (base model + the run's LoRA adapter), in input order.

    Needs a GPU machine with `vllm` installed; the process keeps one engine for every call.
    """
    from tell.model import dtype_name, resolved_dtype
    from tell.vllm_backend import vllm_answers
    model_cfg = run.config.model if run.config else (run.model_cfg or ModelConfig())
    rank = run.config.train.lora_r if run.config else 8
    return vllm_answers(run.model_path, run.adapter_dir, rank, dtype_name(resolved_dtype(model_cfg)), run.tokenizer,
                        texts, cfg, max_new_tokens, stop_token_ids(run.model_path, run.tokenizer))


def answer_token_count(tokenizer, answers: list[str], max_new_tokens: int) -> int:
    """Return the new tokens of generated answers: each re-tokenised, capped at the budget it was generated under
    (decoded text can re-tokenise into more ids than were generated, a random model's above all)."""
    return sum(min(len(tokenizer(a, add_special_tokens=False)["input_ids"]), max_new_tokens) for a in answers)


def answer_texts(run: LoadedRun, texts: list[str], cfg: GenerateConfig, max_new_tokens: int,
                 progress: bool = True) -> list[str]:
    """Return the answers from the backend the config names (transformers or vLLM)."""
    if cfg.backend == "vllm":
        return vllm_texts(run, texts, cfg, max_new_tokens)
    return generate_texts(run.model, run.tokenizer, texts, cfg, max_new_tokens, progress)
