"""Tiny random-weight stand-ins for the 7B-8B families users train (no GPU, no hub): Llama-3 (two stop ids in
its generation config), Qwen2 (attention biases, ChatML), Gemma (no system role, `<end_of_turn>` ends a turn),
Mistral (sliding window, [INST] template) and a base model without any chat template. Each trains one step
and generates through the CLI; the stop-id, system-role and stop-learning behaviours are checked on them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tell import cli

FIXTURES = Path(__file__).parent / "fixtures"
ALPACA_DEMO = Path(__file__).parents[1] / "src" / "tell" / "datasets" / "alpaca_en_demo.json"
pytestmark = pytest.mark.filterwarnings("ignore:training takes only", "ignore:warmup")

LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}"
                  "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
                  "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                    "{% endif %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

# family -> (config class, extra config fields, special tokens (the first gets id 0), bos, eos, stop ids of the
# generation config, chat template)
FAMILIES = {
    "llama3": ("LlamaConfig", {}, ["<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>"], "<|begin_of_text|>", "<|end_of_text|>", ["<|end_of_text|>", "<|eot_id|>"],
               LLAMA3_TEMPLATE),
    "qwen2": ("Qwen2Config", {}, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
              ["<|im_end|>", "<|endoftext|>"], CHATML_TEMPLATE),
    "gemma": ("GemmaConfig", {"head_dim": 8}, ["<end_of_turn>", "<pad>", "<eos>", "<bos>", "<start_of_turn>"],
              "<bos>", "<eos>", ["<end_of_turn>"], GEMMA_TEMPLATE),
    "mistral": ("MistralConfig", {"sliding_window": 4096}, ["<unk>", "<s>", "</s>"], "<s>", "</s>", ["</s>"],
                MISTRAL_TEMPLATE),
    "base": ("LlamaConfig", {}, ["<unk>", "<s>", "</s>"], "<s>", "</s>", ["</s>"], None),
}


def build_family(family: str, out: Path) -> Path:
    """Write a seeded tiny random model of `family` with its tokenizer and generation config into `out`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    config_class, extra, specials, bos, eos, stops, template = FAMILIES[family]
    rows = json.loads(ALPACA_DEMO.read_text(encoding="utf-8"))[:150]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([f"{r['instruction']} {r['input']} {r['output']}" for r in rows],
                            trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, chat_template=template)
    ids = tokenizer.convert_tokens_to_ids
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=ids(bos) if bos else None,
        eos_token_id=[ids(t) for t in stops], tie_word_embeddings=True, initializer_range=0.3, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [ids(t) for t in stops]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family_dir(request, tmp_path_factory):
    return build_family(request.param, tmp_path_factory.mktemp(request.param))


def _train(model_dir: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", "--task", str(FIXTURES / "alpaca.jsonl"), "--general", str(FIXTURES / "general.jsonl"),
                     "--model", str(model_dir), "--ratio", "1", "--batch-size", "4", "--max-steps", "1",
                     "--train.warmup_ratio", "0", "--lr", "1e-2", "--save-every", "0", "--out", str(out), *extra])


@pytest.mark.parametrize("family_dir", ["llama3", "qwen2", "gemma", "mistral", "base"], indirect=True)
def test_one_training_step_and_one_generation_through_the_cli(family_dir, tmp_path):
    from safetensors.torch import load_file
    run = tmp_path / "run"
    assert _train(family_dir, run) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["optimizer_steps"] == 1 and summary["dtype"] == "fp32" and summary["micro_batch_tokens"] == 768
    lora_b = [v for k, v in load_file(run / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # the step reached every adapter
    output = tmp_path / "answers.jsonl"
    assert cli.main(["generate", "--run", str(run), "--prompts", str(FIXTURES / "prompts.jsonl"), "--greedy",
                     "--max-new-tokens", "6", "--output", str(output)]) == 0
    answers = [json.loads(line)["output"] for line in output.read_text().splitlines()]
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_qwen2_stand_in_has_attention_biases_and_they_stay_frozen(tmp_path):
    from tell.config import ModelConfig, TrainConfig
    from tell.model import load_model
    from tell.train import add_lora
    model, _ = load_model(ModelConfig(name=str(build_family("qwen2", tmp_path / "q")), device="cpu"))
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    peft = add_lora(model, TrainConfig())
    assert not any(p.requires_grad for n, p in peft.named_parameters() if n.endswith("q_proj.base_layer.bias"))


def test_generation_stops_at_every_stop_id_of_the_generation_config(tmp_path):
    """The Llama-3 stand-in ends turns with <|eot_id|> (id 0), which is not the tokenizer's EOS. With its final
    norm zeroed every logit ties and greedy decoding picks id 0 at once: the answer must stop there."""
    from tell.config import GenerateConfig, ModelConfig
    from tell.generate import decode_batch, generate_texts, stop_token_ids
    from tell.model import load_model
    model_dir = build_family("llama3", tmp_path / "llama3")
    model, tokenizer = load_model(ModelConfig(name=str(model_dir), device="cpu"))
    eot, end = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert eot == 0 and tokenizer.eos_token_id == end != eot
    assert stop_token_ids(model, tokenizer) == stop_token_ids(str(model_dir), tokenizer) == (eot, end)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    cfg = GenerateConfig(greedy=True)
    ids = torch.tensor([tokenizer("Hello there", add_special_tokens=False)["input_ids"]])
    assert decode_batch(model, ids, torch.ones_like(ids), cfg, 8, stop_token_ids(model, tokenizer)) == [[eot]]
    assert decode_batch(model, ids, torch.ones_like(ids), cfg, 8, tokenizer.eos_token_id) == [[eot] * 8]
    assert generate_texts(model, tokenizer, ["Hello there", "Hi"], cfg, 8, progress=False) == ["", ""]


def test_system_placement_with_a_template_without_system_role_is_a_clear_error(tmp_path, capsys):
    model_dir = build_family("gemma", tmp_path / "gemma")
    out = tmp_path / "run"
    assert _train(model_dir, out, "--anchor", "Answer briefly.", "--anchor-placement", "system") == 2
    err = capsys.readouterr().err
    assert str(model_dir) in err and "--anchor-placement" in err and "System role not supported" in err
    assert "Traceback" not in err and not out.exists() and not out.with_name("run.partial").exists()
    assert _train(model_dir, out, "--anchor", "Answer briefly.", "--anchor-placement", "user-prefix") == 0


def test_a_base_model_without_chat_template_learns_to_stop(tmp_path):
    """Rows of a template-less tokenizer start with BOS and end with a trained EOS: after training, greedy
    answers end at EOS, where the untrained model runs to the token limit."""
    from tell.config import GenerateConfig, ModelConfig
    from tell.generate import decode_batch, load_for_generation, prompt_texts
    from tell.model import load_model
    model_dir = build_family("base", tmp_path / "base")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Is {n} a number?", "response": "Yes."}) + "\n"
                            for n in ("one", "two", "three", "four", "five", "six", "seven", "eight")))
    run = tmp_path / "run"
    assert cli.main(["train", "--task", str(task), "--mode", "sft", "--model", str(model_dir), "--batch-size", "2",
                     "--epochs", "12", "--lr", "1e-2", "--train.warmup_ratio", "0", "--save-every", "0",
                     "--train.target_modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                     "--train.lora_dropout", "0", "--out", str(run)]) == 0
    cfg, limit = GenerateConfig(greedy=True), 24
    prompts = [({"role": "user", "content": f"Is {n} a number?"},) for n in ("nine", "ten", "one")]
    trained = load_for_generation(str(run))
    base, tokenizer = load_model(ModelConfig(name=str(model_dir), device="cpu"))
    texts = prompt_texts(trained, prompts)
    assert all(t.startswith("<s>") and t.count("<s>") == 1 for t in texts)
    stopped = {}
    for name, model in (("trained", trained.model), ("untrained", base)):
        answers = []
        for text in texts:
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            answers.append(decode_batch(model, ids, torch.ones_like(ids), cfg, limit, tokenizer.eos_token_id)[0])
        stopped[name] = sum(a[-1] == tokenizer.eos_token_id and len(a) < limit for a in answers)
        if name == "trained":
            assert [tokenizer.decode(a) for a in answers] == ["Yes.</s>"] * 3
    assert stopped == {"trained": 3, "untrained": stopped["untrained"]} and stopped["untrained"] < 3


def test_a_rows_own_system_message_is_folded_into_the_user_turn_where_the_template_rejects_it(tmp_path):
    """Gemma's template raises on a system role; a data row's system message goes before its user text."""
    from tell.mix import render_prompt
    tokenizer = build_family("gemma", tmp_path / "gemma")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    prompt = render_prompt(tokenizer, ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}))
    assert prompt == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
