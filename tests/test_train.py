"""Tests of tell.train on the tiny model: the loss falls on a repeated example, only LoRA weights move,
the saved adapter reloads to identical logits, batching covers every row once, the labelled-only LM head
matches the model's own loss, and the step log splits the loss by source."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tell.config import MixConfig, ModelConfig, TrainConfig
from tell.data import Example, load_examples
from tell.mix import build_mix
from tell.model import load_model, quiet_peft
from tell.packing import Row, collate, labelled_spans, micro_batches, token_losses
from tell.train import add_lora, epoch_batches, plan_schedule, read_log, train_lora, training_rows

FIXTURES = Path(__file__).parent / "fixtures"
REPEATED = Example("task:capital.jsonl:1", (
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
), "task", "capital.jsonl", 1)
# 8 steps at batch 2 on one repeated row: enough for the tiny model to start memorising it.
FAST = TrainConfig(max_steps=8, batch_size=2, lr=5e-3, warmup_ratio=0.0)


def fresh_model(model_dir, dtype: str = "fp32"):
    return load_model(ModelConfig(name=str(model_dir), device="cpu", dtype=dtype))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """Return (base weights before, trained peft model, TrainResult, run dir) of one short run."""
    model, tokenizer = fresh_model(tiny_model_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    mix = build_mix([REPEATED] * 16, [], MixConfig(mode="sft"), tokenizer, 512)
    out = tmp_path_factory.mktemp("train-run")
    with pytest.warns(UserWarning, match="only 8 optimizer step"):
        peft_model, result = train_lora(model, tokenizer, mix, FAST, out)
    return before, peft_model, result, out


def test_loss_falls_on_a_repeated_example(trained):
    _, _, result, out = trained
    log = read_log(out / "train_log.jsonl")
    losses = [r["loss"] for r in log]
    assert len(losses) == result.optimizer_steps == 8
    assert losses[-1] < losses[0] - 1.0
    assert all(r["loss_general"] is None and r["loss_task"] == r["loss"] for r in log)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["final_loss"] == losses[-1] and summary["optimizer_steps"] == 8
    assert (out / "loss_curve.png").stat().st_size > 0


def test_lora_weights_change_and_base_weights_do_not(trained, tiny_model_dir):
    before, peft_model, _, _ = trained
    initial, _ = fresh_model(tiny_model_dir)
    initial = add_lora(initial, FAST)  # same seed, so the same LoRA init as the run had
    initial_lora = {n: p.detach().clone() for n, p in initial.named_parameters() if "lora_" in n}
    lora, base = {}, {}
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            lora[name] = param
        else:
            base[name.replace("base_model.model.", "", 1).replace(".base_layer", "")] = param
    assert lora.keys() == initial_lora.keys() and len(lora) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)
    for name, param in lora.items():
        assert not torch.equal(param, initial_lora[name]), name
    assert base.keys() == before.keys()
    for name, param in base.items():
        assert torch.equal(param, before[name]), name
        assert not param.requires_grad


def test_saved_adapter_reloads_to_identical_logits(trained, tiny_model_dir, tiny_tokenizer):
    from peft import PeftModel
    _, peft_model, _, out = trained
    assert (out / "adapter" / "adapter_config.json").is_file()
    with quiet_peft():
        reloaded = PeftModel.from_pretrained(fresh_model(tiny_model_dir)[0], str(out / "adapter")).eval()
    ids = torch.tensor([tiny_tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        base = fresh_model(tiny_model_dir)[0](input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter does change the model


def rows_of_lengths(lengths: list[int]) -> list[Row]:
    return [Row(tuple(range(n)), ((1, n),), "task" if i % 3 == 0 else "general") for i, n in enumerate(lengths)]


def test_epoch_batches_cover_every_row_once_per_epoch():
    rows = rows_of_lengths([5 + i for i in range(23)])
    one = epoch_batches(rows, batch_size=4, epochs=1, seed=0)
    assert [r for batch in one for r in batch] == rows  # epoch 1 keeps the mix order
    assert [len(b) for b in one] == [4] * 5 + [3]
    three = epoch_batches(rows, batch_size=4, epochs=3, seed=0)
    assert len(three) == 18
    for epoch in range(3):
        seen = [id(r) for batch in three[6 * epoch: 6 * epoch + 6] for r in batch]
        assert sorted(seen) == sorted(id(r) for r in rows)
    assert three[6:12] != three[:6]  # later epochs are reshuffled
    assert three == epoch_batches(rows, batch_size=4, epochs=3, seed=0)


@pytest.mark.parametrize("max_tokens", [1, 40, 100, 10_000])
def test_micro_batches_respect_the_token_limit_and_cover_the_batch(max_tokens):
    batch = rows_of_lengths([30, 7, 19, 50, 3, 12, 33, 8])
    groups = micro_batches(batch, max_tokens)
    assert sorted(id(r) for g in groups for r in g) == sorted(id(r) for r in batch)
    for group in groups:
        padded = max(len(r.input_ids) for r in group) * len(group)
        assert padded <= max_tokens or len(group) == 1  # a single row longer than the limit goes alone
    if max_tokens == 10_000:
        assert len(groups) == 1


def test_labelled_only_head_loss_equals_the_models_own_loss(tiny_model, tiny_tokenizer):
    model = tiny_model
    examples = load_examples(FIXTURES / "chat.jsonl", "task")
    mix = build_mix(examples, [], MixConfig(mode="sft"), tiny_tokenizer, 512)
    batch = collate(training_rows(tiny_tokenizer, mix, 512), tiny_tokenizer.pad_token_id, torch.device("cpu"))
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padding is exercised
    with torch.no_grad():
        reference = model(**batch).loss
        losses, rows = token_losses(model, batch)
        torch.testing.assert_close(losses.mean(), reference, rtol=0, atol=1e-5)
        assert sorted(set(rows.tolist())) == list(range(len(examples)))
        wrapped = add_lora(model, TrainConfig())  # B = 0 at init: the adapter adds nothing yet
        torch.testing.assert_close(token_losses(wrapped, batch)[0].mean(), reference, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:training takes only")
def test_step_log_splits_loss_by_source_and_trains_each_task_row_once(tiny_model, tiny_tokenizer, general_file,
                                                                     tmp_path):
    model, tokenizer = tiny_model, tiny_tokenizer
    task = load_examples(FIXTURES / "alpaca.jsonl", "task")
    long_prompt = Example("task:long.jsonl:1", ({"role": "user", "content": "Explain. " + "why " * 100},
                                                {"role": "assistant", "content": "Because."}), "task", "long.jsonl", 1)
    general = load_examples(general_file, "general")
    # max_length 64 truncates the long row inside its prompt: it counts as a row but has no labels.
    mix = build_mix(task + [long_prompt], general, MixConfig(ratio="max", on_long="truncate"), tokenizer, 64)
    rows = training_rows(tokenizer, mix, 64)
    task_labels = sum(b - a for r in rows if r.source == "task" for a, b in labelled_spans(r))
    _, result = train_lora(model, tokenizer, mix, TrainConfig(batch_size=8, warmup_ratio=0.0), tmp_path)
    log = read_log(tmp_path / "train_log.jsonl")
    assert len(log) == result.optimizer_steps == -(-len(mix.rows) // 8)
    assert all({"loss_task", "loss_general", "task_label_tokens", "general_label_tokens"} <= r.keys() for r in log)
    assert any(r["loss_task"] is not None for r in log) and any(r["loss_general"] is not None for r in log)
    for r in log:
        assert r["label_tokens"] == r["task_label_tokens"] + r["general_label_tokens"]
    assert sum(r["task_label_tokens"] for r in log) == task_labels  # every task row once, in one epoch
    assert result.label_tokens == sum(r["label_tokens"] for r in log)
    assert result.final_loss_task is not None and result.final_loss_general is not None


def test_short_runs_and_all_warmup_runs_warn():
    with pytest.warns(UserWarning, match="only 2 optimizer step"):
        assert plan_schedule(4, TrainConfig(batch_size=2, warmup_ratio=0.0)) == (2, 0)
    with pytest.warns(UserWarning, match="warmup .* covers every one"):
        plan_schedule(400, TrainConfig(batch_size=2, warmup_ratio=1.0))
    steps, warmup = plan_schedule(1000, TrainConfig(batch_size=16, epochs=2))
    assert (steps, warmup) == (126, 4)  # ceil(1000/16) × 2, ceil(0.03 × 126)
    assert plan_schedule(1000, TrainConfig(max_steps=20))[0] == 20


def _checkpointed_step(model_dir, rows, checkpointing: bool):
    """Return (loss, LoRA gradients) of one packed forward + backward, dropout on, seeded the same way."""
    from tell.packing import collate_packed, packed_attention, packed_micro_batches
    model, _ = fresh_model(model_dir)
    model = add_lora(model, TrainConfig(gradient_checkpointing=checkpointing, lora_dropout=0.1, lora_r=4))
    model.train()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.fill_(0.05)
    torch.manual_seed(7)
    total = 0.0
    for group in packed_micro_batches(rows, 80):
        with packed_attention(model):  # as _train_step: the recomputing backward inside the routing
            losses, _ = token_losses(model, collate_packed(group, torch.device("cpu")))
            loss = losses.sum() / 100
            loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_plain_loss_and_lora_gradients(tiny_model_dir, tiny_tokenizer):
    """Non-reentrant checkpointing recomputes each layer in backward (same LoRA dropout draws: the RNG state
    is replayed): loss and LoRA gradients equal the plain path's."""
    examples = load_examples(FIXTURES / "general.jsonl", "general")[:10]
    rows = training_rows(tiny_tokenizer, build_mix(examples, [], MixConfig(mode="sft"), tiny_tokenizer, 512), 512)
    plain_loss, plain = _checkpointed_step(tiny_model_dir, rows, False)
    loss, grads = _checkpointed_step(tiny_model_dir, rows, True)
    assert loss == plain_loss
    assert grads.keys() == plain.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_is_on_in_the_trained_model(tiny_model_dir):
    model, _ = fresh_model(tiny_model_dir)
    peft_model = add_lora(model, TrainConfig(gradient_checkpointing=True))
    layers = peft_model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)


def test_fp16_training_runs_with_loss_scaling_and_records_its_dtype(tiny_model_dir, tmp_path):
    """--dtype fp16 (GPUs without bf16) on the CPU: base in fp16, LoRA in fp32, a GradScaler in the loop; the
    loss falls as in fp32 and train_summary.json says which dtype ran."""
    from tell import cli
    common = ["train", "--task", str(FIXTURES / "alpaca.jsonl"), "--general", str(FIXTURES / "general.jsonl"),
              "--model", str(tiny_model_dir), "--ratio", "max", "--batch-size", "4", "--lr", "1e-2",
              "--train.warmup_ratio", "0", "--save-every", "0"]
    for dtype in ("fp16", "fp32"):
        assert cli.main([*common, "--dtype", dtype, "--out", str(tmp_path / dtype)]) == 0
    half, full = (read_log(tmp_path / d / "train_log.jsonl") for d in ("fp16", "fp32"))
    assert json.loads((tmp_path / "fp16" / "train_summary.json").read_text())["dtype"] == "fp16"
    assert json.loads((tmp_path / "fp32" / "train_summary.json").read_text())["dtype"] == "fp32"
    assert all(math.isfinite(r["loss"]) for r in half)
    assert half[-1]["loss"] < half[0]["loss"]
    for a, b in zip(half, full):
        assert abs(a["loss"] - b["loss"]) < 0.05 * b["loss"]


def test_grad_scaler_is_on_for_fp16_only(tiny_model_dir, tmp_path, monkeypatch):
    import tell.train
    seen = []
    original = torch.amp.GradScaler

    def recording(device, enabled=True, **kwargs):
        seen.append(enabled)
        return original(device, enabled=enabled, **kwargs)
    monkeypatch.setattr(tell.train.torch.amp, "GradScaler", recording)
    tokenizer = fresh_model(tiny_model_dir)[1]
    mix = build_mix([REPEATED] * 2, [], MixConfig(mode="sft"), tokenizer, 512)
    cfg = TrainConfig(batch_size=2, warmup_ratio=0.0, save_every=0)
    with pytest.warns(UserWarning):
        train_lora(fresh_model(tiny_model_dir, "fp16")[0], tokenizer, mix, cfg, tmp_path / "a", autocast=torch.float16)
        train_lora(fresh_model(tiny_model_dir, "bf16")[0], tokenizer, mix, cfg, tmp_path / "b", autocast=torch.bfloat16)
    assert seen == [True, False]


def test_micro_batch_tokens_default_depends_on_the_device():
    from tell.train import micro_batch_tokens
    assert micro_batch_tokens(TrainConfig(), torch.device("cpu")) == 768
    assert micro_batch_tokens(TrainConfig(), torch.device("cuda", 0)) == 2048
    assert micro_batch_tokens(TrainConfig(micro_batch_tokens=300), torch.device("cuda", 0)) == 300


@pytest.mark.filterwarnings("ignore:training takes only")  # 6 steps on purpose: a short run
def test_a_checkpointed_training_run_logs_the_plain_runs_losses(tiny_model_dir, tmp_path):
    from tell import cli
    common = ["train", "--task", str(FIXTURES / "alpaca.jsonl"), "--general", str(FIXTURES / "general.jsonl"),
              "--model", str(tiny_model_dir), "--ratio", "max", "--batch-size", "8", "--lr", "1e-2",
              "--save-every", "0"]
    assert cli.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert cli.main([*common, "--gradient-checkpointing", "--out", str(tmp_path / "ckpt")]) == 0
    plain, ckpt = (read_log(tmp_path / d / "train_log.jsonl") for d in ("plain", "ckpt"))
    import yaml
    assert [yaml.safe_load((tmp_path / d / "config.yaml").read_text())["train"]["gradient_checkpointing"]
            for d in ("plain", "ckpt")] == [False, True]
    assert len(plain) == len(ckpt) > 3
    for a, b in zip(plain, ckpt):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
