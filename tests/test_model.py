"""Tests of tell.model: the dtype policy (auto = fp32 on every CPU), loading straight into the asked dtype with
the rotary frequencies kept in fp32 (and the bf16 model's logits at position 600 within bf16 tolerance of
fp32, which a `model.to(bf16)` model is not), one base shared across compare arms and restored exactly
between them, and the 4-bit option's errors where it cannot run."""
from __future__ import annotations

import pytest
import torch

from tell import cli
from tell.config import ModelConfig
from tell.model import (dtype_name, four_bit_config, keep_rotary_fp32, load_model, quiet_peft, resolved_dtype,
                        shared_base)

CPU = torch.device("cpu")


def test_auto_dtype_is_fp32_on_the_cpu_and_explicit_choices_win():
    assert resolved_dtype(ModelConfig(dtype="auto"), CPU) == torch.float32
    assert [resolved_dtype(ModelConfig(dtype=d), CPU) for d in ("fp32", "bf16", "fp16")] == \
        [torch.float32, torch.bfloat16, torch.float16]
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_load_model_gives_the_dtype_asked_with_fp32_rotary_buffers(tiny_model_dir, dtype):
    model, _ = load_model(ModelConfig(name=str(tiny_model_dir), dtype=dtype, device="cpu"))
    floats = {p.dtype for p in model.parameters()}
    assert floats == {resolved_dtype(ModelConfig(dtype=dtype), CPU)}
    rotary = {n: b.dtype for n, b in model.named_buffers() if n.endswith("inv_freq")}
    assert rotary and set(rotary.values()) == {torch.float32}, rotary
    assert not model.training


@pytest.fixture(scope="module")
def long_rope_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama with Llama-3's RoPE (theta 500000, head_dim 64) and room for 600 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, intermediate_size=256, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, initializer_range=0.1)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("long-rope")
    LlamaForCausalLM(config).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


# bf16 keeps 8 bits of mantissa: a bf16 model's logits sit about 1% of the fp32 logits' spread from them
# (measured 1.2% on this model at every position); rounded rotary frequencies add a phase error that grows
# with the position (6.3% at positions 500-600, 1.3% at 0-50). Tolerance: mean absolute error over the last
# 100 positions, relative to the fp32 logits' standard deviation.
BF16_LOGIT_TOLERANCE = 0.03


def _relative_logit_error(model, reference_logits, ids) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return float((logits - reference_logits)[0, -100:].abs().mean() / reference_logits.std())


def test_bf16_logits_at_position_600_match_fp32_and_a_cast_model_does_not(long_rope_model_dir):
    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(1))
    fp32, _ = load_model(ModelConfig(name=str(long_rope_model_dir), dtype="fp32", device="cpu"))
    with torch.no_grad():
        reference = fp32(input_ids=ids).logits.float()
    bf16, _ = load_model(ModelConfig(name=str(long_rope_model_dir), dtype="bf16", device="cpu"))
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32
    loaded_error = _relative_logit_error(bf16, reference, ids)
    assert loaded_error < BF16_LOGIT_TOLERANCE, loaded_error
    # The old path, fp32 weights cast with .to(bf16), rounds inv_freq as well: far outside the tolerance.
    cast = fp32.to(torch.bfloat16)
    assert cast.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    phase = (600 * (cast.model.rotary_emb.inv_freq.float() - bf16.model.rotary_emb.inv_freq)).abs().max()
    assert phase > 0.5  # radians at position 600 (Llama-3's theta; the issue measured ~1 rad)
    cast_error = _relative_logit_error(cast, reference, ids)
    assert cast_error > 2 * loaded_error and cast_error > BF16_LOGIT_TOLERANCE, (cast_error, loaded_error)
    # The guard recomputes the frequencies: the cast model then agrees like the loaded one.
    assert keep_rotary_fp32(cast) == 1 and keep_rotary_fp32(cast) == 0
    assert _relative_logit_error(cast, reference, ids) == pytest.approx(loaded_error, rel=1e-6, abs=1e-6)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_shared_base_loads_once_and_comes_back_unchanged_after_training_and_merging(tiny_model_dir, tmp_path):
    """Training wraps the shared base with LoRA (and gradient checkpointing hooks), evaluation merges an
    adapter into it; the next load_model hands out the same object with the original logits."""
    from peft import PeftModel
    from tell.config import TrainConfig
    from tell.train import add_lora
    cfg = ModelConfig(name=str(tiny_model_dir), device="cpu")
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    fresh = _logits(load_model(cfg)[0], ids)
    with shared_base():
        model, _ = load_model(cfg)
        peft = add_lora(model, TrainConfig(lora_r=4, gradient_checkpointing=True))
        peft.train()
        for p in peft.parameters():
            if p.requires_grad:
                p.data.normal_()  # a trained adapter: B no longer zero
        peft(input_ids=ids).logits.sum().backward()
        peft.save_pretrained(tmp_path / "adapter")
        again, _ = load_model(cfg)
        assert again is model and not again.training
        assert torch.equal(_logits(again, ids), fresh)
        assert all(p.requires_grad for p in again.parameters()) and all(p.grad is None for p in again.parameters())
        with quiet_peft():  # as generate.py loads adapters
            merged = PeftModel.from_pretrained(again, str(tmp_path / "adapter")).merge_and_unload(safe_merge=True)
        assert not torch.equal(_logits(merged, ids), fresh)
        third, _ = load_model(cfg)
        assert third is model and torch.equal(_logits(third, ids), fresh)
    outside, _ = load_model(cfg)
    assert outside is not model  # outside the context every call loads afresh


def test_quantize_4bit_on_the_cpu_is_a_clear_error_before_any_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "tests/fixtures/alpaca.jsonl", "--quantize", "4bit", "--device", "cpu",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--quantize 4bit" in err and "CUDA" in err and "model.quantize" in err
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_quantize_4bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import sys
    from tell import model as model_module
    from tell.data import TellInputError
    monkeypatch.setattr(model_module, "pick_device", lambda cfg: torch.device("cuda", 0))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(TellInputError, match="pip install bitsandbytes"):
        model_module.check_quantize(ModelConfig(quantize="4bit"))


def test_quantize_config_plumbing(capsys):
    assert cli.main(["train", "--quantize", "4bit", "--gradient-checkpointing", "--dtype", "fp16",
                     "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "quantize: 4bit" in printed and "gradient_checkpointing: true" in printed and "dtype: fp16" in printed
    four_bit = four_bit_config(torch.bfloat16)  # PEFT's QLoRA recipe
    assert four_bit.load_in_4bit and four_bit.bnb_4bit_quant_type == "nf4"
    assert four_bit.bnb_4bit_use_double_quant and four_bit.bnb_4bit_compute_dtype == torch.bfloat16
    assert cli.main(["train", "--quantize", "8bit", "--print-config"]) == 2
    assert "model.quantize" in capsys.readouterr().err


def test_unknown_dtype_is_rejected(capsys):
    assert cli.main(["train", "--dtype", "fp8", "--print-config"]) == 2
    assert "'auto', 'bf16', 'fp16', 'fp32'" in capsys.readouterr().err
