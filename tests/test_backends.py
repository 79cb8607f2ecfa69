"""The vLLM evaluation backend is optional: without the package, asking for it says so on stderr and the
transformers backend runs instead, with the same metrics; an unknown backend is a config error."""
from __future__ import annotations

import importlib.util
import json

import pytest

from tell import cli


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_falls_back_to_transformers(tiny_model_dir, tmp_path, capsys):
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": f"Say word {i}.", "response": f"w{i}"}) + "\n" for i in range(3)))
    common = ["--model", str(tiny_model_dir), "--task", "mine", "--test", str(test), "--metric", "exact",
              "--greedy", "--max-new-tokens", "6"]
    assert cli.main(["eval", "--backend", "vllm", *common, "--out", str(tmp_path / "v")]) == 0
    err = capsys.readouterr().err
    assert "vllm" in err and "transformers backend instead" in err
    assert cli.main(["eval", *common, "--out", str(tmp_path / "t")]) == 0
    asked, plain = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("v", "t"))
    assert asked["backend"] == plain["backend"] == "transformers"
    drop = {"generate_wall_s", "new_tokens_per_s", "wall_s"}
    assert {k: v for k, v in asked.items() if k not in drop} == {k: v for k, v in plain.items() if k not in drop}
    assert "backend: transformers" in (tmp_path / "v" / "config.yaml").read_text()


def test_unknown_backend_is_rejected(capsys):
    assert cli.main(["eval", "--backend", "tensorrt", "--limit", "2"]) == 2
    assert "generate.backend" in capsys.readouterr().err


def test_vllm_max_lora_rank_is_rounded_up_to_a_value_vllm_accepts():
    from tell.data import TellInputError
    from tell.vllm_backend import VLLM_LORA_RANKS, max_lora_rank
    assert [max_lora_rank(r) for r in (1, 4, 8, 9, 16, 17, 64, 100, 300, 512)] == \
        [8, 8, 8, 16, 16, 32, 64, 128, 320, 512]
    assert all(max_lora_rank(r) in VLLM_LORA_RANKS for r in range(1, 513))
    with pytest.raises(TellInputError, match="train.lora_r"):
        max_lora_rank(513)


def test_every_adapter_gets_its_own_lora_int_id(tmp_path):
    from tell.vllm_backend import lora_int_id
    a, b = tmp_path / "runs" / "sft" / "adapter", tmp_path / "runs" / "tell" / "adapter"
    first, second = lora_int_id(str(a)), lora_int_id(str(b))
    assert first != second and first >= 1 and second >= 1
    assert lora_int_id(str(a)) == first and lora_int_id(str(tmp_path / "runs" / "sft" / ".." / "sft" / "adapter")) == first


def test_vllm_prompts_are_token_ids_with_one_bos(tmp_path, tiny_tokenizer):
    """The chat template writes BOS into the text; a text prompt would get a second one from vLLM's tokenizer,
    so the prompts go as token ids, tokenized exactly as the transformers backend does."""
    from tell.vllm_backend import token_prompts
    texts = [tiny_tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                add_generation_prompt=True) for q in ("Hi there", "Name a colour.")]
    assert all(t.startswith(tiny_tokenizer.bos_token) for t in texts)  # the template opens with BOS, as Llama's do
    prompts = token_prompts(tiny_tokenizer, texts)
    assert [set(p) for p in prompts] == [{"prompt_token_ids"}] * 2
    for prompt, text in zip(prompts, texts):
        assert prompt["prompt_token_ids"] == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert prompt["prompt_token_ids"][0] == tiny_tokenizer.bos_token_id
        assert prompt["prompt_token_ids"][1] != tiny_tokenizer.bos_token_id


def test_vllm_sampling_and_engine_arguments_follow_the_config():
    from tell.config import GenerateConfig
    from tell.vllm_backend import engine_kwargs, sampling_kwargs
    paper = sampling_kwargs(GenerateConfig(), 96, (5, 9))
    assert paper == {"temperature": 0.3, "top_k": 20, "top_p": 0.7, "repetition_penalty": 1.05, "max_tokens": 96,
                     "stop_token_ids": [5, 9], "seed": 42}
    greedy = sampling_kwargs(GenerateConfig(greedy=True), 8, (2,))
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == -1 and greedy["stop_token_ids"] == [2]
    assert engine_kwargs("/models/llama", 8, "bf16") == {"model": "/models/llama", "dtype": "bfloat16",
                                                          "enable_lora": True, "max_lora_rank": 8, "max_loras": 1,
                                                          "seed": 0}


def test_one_vllm_engine_per_process(monkeypatch):
    """compare/sweep evaluate arm after arm: the engine is built once for the same arguments and replaced
    (the old one dropped first) only when they change. The factory records what is built; nothing generates."""
    import tell.vllm_backend as backend
    monkeypatch.setattr(backend, "_ENGINE", {})
    built = []

    def factory(**kwargs):
        built.append(kwargs)
        return object()
    first = backend.engine(backend.engine_kwargs("/m", 8, "bf16"), factory)
    assert backend.engine(backend.engine_kwargs("/m", 8, "bf16"), factory) is first
    assert backend.engine(backend.engine_kwargs("/m", 8, "bf16"), factory) is first
    other = backend.engine(backend.engine_kwargs("/m", 64, "bf16"), factory)
    assert other is not first and len(built) == 2 and backend._ENGINE["llm"] is other


def test_vllm_answers_are_decoded_like_the_transformers_backend(tiny_tokenizer):
    from tell.vllm_backend import answer_texts_from_ids
    stop = tiny_tokenizer.eos_token_id
    ids = tiny_tokenizer("Paris is the capital.", add_special_tokens=False)["input_ids"]
    assert answer_texts_from_ids(tiny_tokenizer, [ids + [stop], ids], (stop,)) == ["Paris is the capital."] * 2


def test_vllm_refuses_fp32_before_any_work(capsys):
    from tell.data import TellInputError
    from tell.vllm_backend import engine_kwargs
    with pytest.raises(TellInputError, match="model.dtype"):
        engine_kwargs("/m", 8, "fp32")
    assert cli.main(["eval", "--backend", "vllm", "--dtype", "fp32", "--limit", "2"]) == 2
    assert "model.dtype" in capsys.readouterr().err


def test_loading_a_model_first_shuts_the_vllm_engine_down(monkeypatch, tiny_model_dir):
    """compare trains the next arm (a transformers model) after evaluating with vLLM, whose engine holds most of
    the GPU: loading a model releases it first, shutting its engine core down."""
    import tell.model as model
    import tell.vllm_backend as backend
    from tell.config import ModelConfig
    monkeypatch.setattr(backend, "_ENGINE", {})
    monkeypatch.setattr(model, "_BEFORE_LOAD", [])
    shut = []

    class Core:
        def shutdown(self):
            shut.append(True)

    class Engine:
        llm_engine = type("LLMEngine", (), {"engine_core": Core()})()
    backend.engine(backend.engine_kwargs("/m", 8, "bf16"), lambda **kwargs: Engine())
    assert backend._ENGINE and not shut
    model.load_model(ModelConfig(name=str(tiny_model_dir)))
    assert not backend._ENGINE and shut == [True]
    model.load_model(ModelConfig(name=str(tiny_model_dir)))  # nothing left to release: no second shutdown
    assert shut == [True]
