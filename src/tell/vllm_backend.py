"""Generate-stage helper — the vLLM backend: one engine per process, requests built from token ids.

In: a base model path, the run's LoRA adapter directory (or none), rendered prompt texts, a GenerateConfig and
the stop ids. Out: answer texts, decoded as the transformers backend decodes them. Everything here except
`vllm_answers` and `engine` is plain request building, tested without vLLM; the engine needs a GPU with
`vllm` installed (not run on the CPU-only machines this was written on).
"""
from __future__ import annotations

from tell.config import GenerateConfig
from tell.data import TellInputError

# vLLM accepts only these max_lora_rank values (vllm/config/lora.py, MaxLoRARanks; newer versions add 1).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

_ENGINE: dict = {}
"""The process's one engine: {"key": its engine arguments, "llm": the vllm.LLM}."""
_LORA_IDS: dict[str, int] = {}
"""Adapter directory -> the lora_int_id it has in this process (vLLM caches adapters by that id)."""


def vllm_imports() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def check_vllm() -> None:
    """Raise a clear error when the vLLM backend is asked for but `vllm` does not import."""
    if not vllm_imports():
        raise TellInputError("--backend vllm needs the 'vllm' package (a GPU machine: pip install vllm); "
                             "the default backend 'transformers' works everywhere", None, None,
                             "generate.backend")


def max_lora_rank(rank: int) -> int:
    """Return the smallest max_lora_rank vLLM accepts that holds an adapter of rank `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise TellInputError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]}); "
                         "evaluate with --backend transformers", None, None, "train.lora_r")


def lora_int_id(adapter_dir: str) -> int:
    """Return the adapter's lora_int_id: a different one for every adapter directory of this process (vLLM
    keeps loaded adapters by id, so reusing id 1 for the next compare arm would serve the previous adapter)."""
    from pathlib import Path
    key = str(Path(adapter_dir).resolve())
    return _LORA_IDS.setdefault(key, len(_LORA_IDS) + 1)


def engine_kwargs(model_path: str, lora_rank: int, dtype: str) -> dict:
    """Return the vllm.LLM arguments: LoRA always on (one engine serves the base and every adapter of a
    comparison), the run's dtype (config spelling: bf16, fp16; vLLM's LoRA kernels take no fp32)."""
    if dtype == "fp32":
        raise TellInputError("the vLLM backend serves LoRA adapters in bf16 or fp16 only (its LoRA kernels take no "
                             "fp32): use --dtype bf16 or --backend transformers", None, None, "model.dtype")
    return {"model": str(model_path), "dtype": VLLM_DTYPES[dtype], "enable_lora": True,
            "max_lora_rank": max_lora_rank(lora_rank), "max_loras": 1, "seed": 0}


def token_prompts(tokenizer, texts: list[str]) -> list[dict]:
    """Return TokensPrompt dicts of the rendered prompts, tokenized as the transformers backend tokenizes
    them: the chat template already wrote BOS, and vLLM would add a second one to a text prompt."""
    return [{"prompt_token_ids": list(ids)} for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def sampling_kwargs(cfg: GenerateConfig, max_new_tokens: int, stop_ids: tuple[int, ...]) -> dict:
    """Return the vllm.SamplingParams arguments matching the transformers backend's decoding."""
    common = {"repetition_penalty": cfg.repetition_penalty, "max_tokens": max_new_tokens,
              "stop_token_ids": list(stop_ids), "seed": cfg.seed}
    if cfg.greedy:
        return {**common, "temperature": 0.0, "top_k": -1, "top_p": 1.0}
    return {**common, "temperature": cfg.temperature, "top_k": cfg.top_k or -1, "top_p": cfg.top_p}


def engine(kwargs: dict, factory=None):
    """Return the process's vLLM engine for `kwargs`, building it only when none exists or the arguments
    changed (then the old one is dropped first): compare and sweep evaluate many arms, and each engine takes
    most of the GPU's memory for its KV cache."""
    if _ENGINE.get("key") == kwargs:
        return _ENGINE["llm"]
    release_engine()
    from tell.model import before_loading_a_model, release_shared_base
    release_shared_base()  # training's base model and its cached blocks go back to the GPU first
    if factory is None:
        from vllm import LLM as factory
    _ENGINE.update(key=dict(kwargs), llm=factory(**kwargs))
    # the engine keeps ~90% of the GPU for its KV cache: the next arm's training (or held-out loss) loads a
    # transformers model, and must find that memory free
    before_loading_a_model(release_engine)
    return _ENGINE["llm"]


def release_engine() -> None:
    """Drop the process's engine, if any, and give its GPU memory back: its engine-core process is shut down
    (garbage collection alone may leave it holding the memory), then the allocator's cache is emptied."""
    import gc
    if not _ENGINE:
        return
    core = getattr(getattr(_ENGINE.get("llm"), "llm_engine", None), "engine_core", None)
    if callable(getattr(core, "shutdown", None)):
        core.shutdown()
    _ENGINE.clear()
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def answer_texts_from_ids(tokenizer, token_ids: list[list[int]], stop_ids: tuple[int, ...]) -> list[str]:
    """Return answers decoded as the transformers backend decodes them (a final stop id dropped, special
    tokens skipped), so both backends' texts can be compared token for token."""
    return [tokenizer.decode(ids[:-1] if ids and ids[-1] in stop_ids else ids, skip_special_tokens=True)
            for ids in token_ids]


def vllm_answers(model_path: str, adapter_dir: str, lora_rank: int, dtype: str, tokenizer, texts: list[str],
                 cfg: GenerateConfig, max_new_tokens: int, stop_ids: tuple[int, ...]) -> list[str]:
    """Return vLLM's answers (base model + the adapter, when given) to the rendered prompts, in input order."""
    check_vllm()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    llm = engine(engine_kwargs(model_path, lora_rank, dtype))
    params = SamplingParams(**sampling_kwargs(cfg, max_new_tokens, stop_ids))
    lora = LoRARequest(f"tell-{lora_int_id(adapter_dir)}", lora_int_id(adapter_dir), adapter_dir) \
        if adapter_dir else None
    prompts = [TokensPrompt(**p) for p in token_prompts(tokenizer, texts)]
    outputs = llm.generate(prompts, params, lora_request=lora)
    return answer_texts_from_ids(tokenizer, [list(o.outputs[0].token_ids) for o in outputs], stop_ids)
