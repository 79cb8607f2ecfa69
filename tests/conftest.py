"""Shared test fixtures: hermetic environment, a seeded tiny Llama with an in-process tokenizer, and row files.

The tiny model (2 layers, hidden 32) is built once per session and saved with `save_pretrained`, so every
stage and the CLI load it through the ordinary `--model DIR` path. Tests never reach a hub: the offline
switches are set before transformers is imported and again around every test.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# huggingface_hub reads these once at import time, so they must be set before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The trackers' tests must not reach the network: W&B offline and without error reports, no MLflow telemetry
# (MLflow reads part of this at import time too).
TRACKERS_OFFLINE = {"WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true",
                    "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
os.environ.update(TRACKERS_OFFLINE)

# The tiny model gains nothing from threads, and on a shared 2-core machine extra threads only spin.
torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
ALPACA_DEMO = Path(__file__).parents[1] / "src" / "tell" / "datasets" / "alpaca_en_demo.json"

# SmolLM2's ChatML template, with a shorter default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, request, tmp_path_factory):
    """Fail any hub access; keep the GGUF cache in a temp dir except for tests of the real model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    for name, value in TRACKERS_OFFLINE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # runs keep their MLflow store in the run dir
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if request.node.get_closest_marker("slow") is None:
        # Slow tests keep the default ~/.cache/tell, so the real model is dequantised (~25 s) only once.
        monkeypatch.setenv("TELL_CACHE", str(tmp_path_factory.getbasetemp() / "tell-cache"))


def _train_tokenizer():
    """Return a byte-level BPE tokenizer (1024 tokens) trained on 300 shipped Alpaca rows, with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    rows = json.loads(ALPACA_DEMO.read_text(encoding="utf-8"))[:300]
    lines = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Return a directory holding a seeded random tiny Llama and its tokenizer (loadable as --model DIR)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = _train_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=0.3)  # HF's 0.02 gives near-uniform logits that LoRA barely moves
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """Return the tiny model's tokenizer as the pipeline loads it."""
    from tell.model import load_tokenizer
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def tiny_model(tiny_model_dir):
    """Return a fresh fp32 copy of the tiny model (training wraps it in place, so one per test)."""
    from tell.config import ModelConfig
    from tell.model import load_model
    model, _ = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    return model


@pytest.fixture(scope="session")
def task_files() -> dict[str, Path]:
    """Return one small task file per row shape."""
    return {"alpaca": FIXTURES / "alpaca.jsonl", "alpaca-json": FIXTURES / "alpaca.json",
            "pair": FIXTURES / "pair.jsonl", "chat": FIXTURES / "chat.jsonl"}


@pytest.fixture(scope="session")
def general_file() -> Path:
    """Return 40 short Alpaca rows used as the general pool of tiny-model runs."""
    return FIXTURES / "general.jsonl"


def write_sharegpt(path: Path, conversations: list[list[tuple[str, str]]]) -> Path:
    """Write conversations [(speaker, text), ...] as a pretty-printed ShareGPT JSON array (the package's shape)."""
    elements = [{"id": f"c{i}_0", "conversations": [{"from": who, "value": text} for who, text in turns]}
                for i, turns in enumerate(conversations)]
    path.write_text(json.dumps(elements, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def sharegpt_pool_of(path: Path):
    """Return the IndexedPool of a ShareGPT-shaped file, its sha256 taken as the expected one."""
    import hashlib
    from tell.sharegpt import indexed_pool
    return indexed_pool(path, hashlib.sha256(path.read_bytes()).hexdigest(), name=path.stem)


@pytest.fixture(scope="session")
def alpaca_as_sharegpt(tmp_path_factory):
    """Return the 999 shipped Alpaca rows as an IndexedPool (a ShareGPT-shaped file read on demand)."""
    rows = json.loads(ALPACA_DEMO.read_text(encoding="utf-8"))
    conversations = [[("human", f"{r['instruction']}\n\n{r['input']}" if r["input"].strip() else r["instruction"]),
                      ("gpt", r["output"])] for r in rows]
    folder = tmp_path_factory.mktemp("sharegpt")
    with pytest.MonkeyPatch.context() as patch:  # session fixtures run before _hermetic: keep the index out of ~
        patch.setenv("TELL_CACHE", str(folder / "cache"))
        return sharegpt_pool_of(write_sharegpt(folder / "alpaca.json", conversations))
