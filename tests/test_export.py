"""`tell export-model`: the merged transformers directory gives the logits of base + adapter; a GGUF written from
the tiny model loads back with transformers' GGUF loader with the same logits (F32: to float rounding; Q8_0: within
its quantisation error), the same tokenizer and chat template; a model GGUF cannot hold is refused (exit 2)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tell import cli
from tell.model import quiet_peft

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.filterwarnings("ignore:training takes only", "ignore:warmup")
TEXTS = ["What is the capital of France? 12345", "Translate: good morning, my friend!\n\n  done."]


def _train(model_dir, out: Path, *extra: str) -> Path:
    # a high learning rate, so the merged adapter visibly moves the logits
    assert cli.main(["train", "--task", str(FIXTURES / "alpaca.jsonl"), "--general", str(FIXTURES / "general.jsonl"),
                     "--model", str(model_dir), "--ratio", "1", "--batch-size", "2", "--max-steps", "3",
                     "--lr", "3e-2", "--train.warmup_ratio", "0", "--anchor", "### Task: say it well.",
                     "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    return _train(tiny_model_dir, tmp_path_factory.mktemp("export") / "run")


def _ids(model_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


@torch.inference_mode()
def _logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits.float()


@torch.inference_mode()
def _base_and_adapter(tiny_model_dir, run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    inputs = _ids(tiny_model_dir)
    plain = _logits(base, inputs)
    with quiet_peft():
        adapted = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    return plain, _logits(adapted, inputs), inputs


def test_hf_export_equals_base_plus_adapter(tiny_model_dir, run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    out = tmp_path / "hf"
    assert cli.main(["export-model", "--run", str(run), "--out", str(out)]) == 0
    assert "hf export" in capsys.readouterr().out and not (tmp_path / "hf.partial").exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json",
                 "anchor.txt", "README.md", "tell_config.yaml"):
        assert (out / name).is_file(), name
    plain, adapted, inputs = _base_and_adapter(tiny_model_dir, run)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32  # the base's dtype
    got = _logits(merged, inputs)
    assert (adapted - plain).abs().max() > 1e-2  # the adapter changes the model...
    # ...and the merged weights carry exactly that change (fp32 sums in another order: ~1e-5 on logits up to ~8)
    assert torch.allclose(got, adapted, atol=1e-4, rtol=0)
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert AutoTokenizer.from_pretrained(out).chat_template == original.chat_template
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.do_sample, generation.temperature, generation.top_k, generation.top_p,
            generation.repetition_penalty) == (True, 0.3, 20, 0.7, 1.05)
    assert (out / "anchor.txt").read_text() == "### Task: say it well."
    readme = (out / "README.md").read_text()
    assert "user-prefix" in readme and 'anchor + "\\n\\n" + task_input' in readme


def test_hf_export_keeps_a_bf16_base_in_bf16(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    base = tmp_path / "bf16-base"
    shutil.copytree(tiny_model_dir, base)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    run = _train(base, tmp_path / "run", "--dtype", "fp32")
    assert cli.main(["export-model", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16


@torch.inference_mode()
def _q8_0_round_trip(model):
    """Return the model with every 2-D weight rounded as Q8_0 stores it (blocks of 32 along each row)."""
    import gguf
    kind = gguf.GGMLQuantizationType.Q8_0
    for param in model.parameters():
        if param.ndim == 2:
            stored = gguf.quants.dequantize(gguf.quants.quantize(param.float().numpy(), kind), kind)
            param.copy_(torch.from_numpy(stored.reshape(param.shape)))
    return model


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_gguf_export_loads_back_with_transformers(tiny_model_dir, run, tmp_path, gguf_type):
    """F32 holds the merged weights exactly; Q8_0 holds them rounded to 8 bits per block of 32, so its logits are
    compared with the merged model rounded the same way (and the rounding's own effect is printed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / gguf_type
    assert cli.main(["export-model", "--run", str(run), "--out", str(out), "--format", "gguf",
                     "--gguf-type", gguf_type]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "anchor.txt", "model.gguf", "tell_config.yaml"]
    _, adapted, inputs = _base_and_adapter(tiny_model_dir, run)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    got = _logits(loaded, inputs)
    if gguf_type == "q8_0":
        from tell.export import merged_model
        from tell.generate import load_run_config
        reference = _logits(_q8_0_round_trip(merged_model(load_run_config(run), run).float()), inputs)
        print(f"q8_0: max |logit - unquantised logit| {(got - adapted).abs().max():.3f}, logits up to "
              f"{adapted.abs().max():.1f} (a random tiny model amplifies the rounding)")
        adapted = reference
    assert torch.allclose(got, adapted, atol=1e-4, rtol=0)
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    read_back = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    for text in TEXTS + ["<|im_start|>user\nHi<|im_end|>\n"]:
        assert read_back(text)["input_ids"] == original(text)["input_ids"], text
    assert read_back.chat_template == original.chat_template
    assert read_back.eos_token == original.eos_token and read_back.pad_token == original.pad_token


def test_architectures_gguf_cannot_hold_are_refused_before_loading(run, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    other = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(other)
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["model"]["name"] = str(other)
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert cli.main(["export-model", "--run", str(run_copy), "--out", str(out), "--format", "gguf"]) == 2
    assert "GGUF export supports LlamaForCausalLM" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert cli.main(["export-model", "--run", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "not a finished tell run" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_exports_in_both_formats(tmp_path):
    """The embedded SmolLM2 (a Llama with a SmolLM BPE tokenizer, from a GGUF): a 1-step run, exported as a
    transformers directory and as a Q8_0 GGUF, loads back with the merged logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tell.export import merged_model
    from tell.generate import load_run_config
    from tell.model import resolve_model_path
    run = tmp_path / "run"
    assert cli.main(["train", "--task", str(FIXTURES / "alpaca.jsonl"), "--ratio", "0", "--mode", "sft",
                     "--batch-size", "2", "--max-steps", "1", "--lr", "1e-3", "--train.warmup_ratio", "0",
                     "--dtype", "fp32", "--out", str(run)]) == 0
    for fmt in ("hf", "gguf"):
        assert cli.main(["export-model", "--run", str(run), "--out", str(tmp_path / fmt), "--format", fmt,
                         "--gguf-type", "q8_0"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    inputs = tokenizer(TEXTS[:1], return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("default"), dtype=torch.float32).eval()
    with quiet_peft():
        expected = _logits(PeftModel.from_pretrained(base, str(run / "adapter")).eval(), inputs)
    hf = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), inputs)
    print(f"real model, hf export: max |logit - base+adapter logit| {(hf - expected).abs().max():.2e}")
    assert torch.allclose(hf, expected, atol=1e-3, rtol=0)
    gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf", dtype=torch.float32).eval()
    got = _logits(gguf, inputs)
    print(f"real model, Q8_0 GGUF: max |logit - merged fp32 logit| {(got - expected).abs().max():.3f}, "
          f"top-1 agreement {(got.argmax(-1) == expected.argmax(-1)).float().mean():.3f}")
    reference = _logits(_q8_0_round_trip(merged_model(load_run_config(run), run)), inputs)
    assert torch.allclose(got, reference, atol=1e-3, rtol=0)
