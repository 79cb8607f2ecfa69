"""Correctness of tell's fast training path on the tiny model: the loss of a fixed batch computed the way
`_train_step` computes it (packed padding-free micro-batches, per-row causal attention, LM head only at
labelled positions, bf16 frozen weights) equals plain PEFT's ``model(input_ids, attention_mask,
labels=...).loss`` — exactly in fp32, within bf16 tolerance in bf16 — and so do the LoRA gradients.
Timings live in benchmarks/, not here."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tell.config import MixConfig, TrainConfig
from tell.data import load_examples
from tell.mix import build_mix
from tell.packing import (SparseDropout, can_pack, collate, collate_packed, micro_batches, packed_micro_batches,
                          token_losses)
from tell.train import add_lora, training_rows

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def rows(tiny_tokenizer):
    examples = load_examples(FIXTURES / "chat.jsonl", "task") + load_examples(FIXTURES / "general.jsonl", "general")
    mix = build_mix(examples, [], MixConfig(mode="sft"), tiny_tokenizer, 512)
    return training_rows(tiny_tokenizer, mix, 512)[:12]


def lora_model(model, dtype=None, dropout: float | None = None):
    """Return the model with LoRA whose B matrices are non-zero (so the adapter changes the loss); `dropout`:
    its LoRA dropout (default: the paper's 0.05)."""
    if dtype is not None:
        model = model.to(dtype)
    model = add_lora(model, TrainConfig() if dropout is None else TrainConfig(lora_dropout=dropout))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    return model.eval()


def tell_loss(model, rows, autocast=None, max_tokens=10**6):
    """Return the mean labelled-token loss as _train_step computes it (packed micro-batches)."""
    total, count = 0.0, 0
    for group in packed_micro_batches(rows, max_tokens):
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            losses, _ = token_losses(model, collate_packed(group, torch.device("cpu")))
        total, count = total + losses.sum(), count + losses.numel()
    return total / count


@contextmanager
def pefts_own_forward(model):
    """Context: the LoRA layers run PEFT's forward (the fused one add_lora installs taken off)."""
    fused = {m: m.__dict__.pop("forward") for m in model.modules() if "forward" in m.__dict__}
    try:
        yield
    finally:
        for module, forward in fused.items():
            module.forward = forward


def plain_peft_loss(model, rows, pad_id):
    batch = collate(rows, pad_id, torch.device("cpu"))
    with pefts_own_forward(model):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_tiny_model_takes_the_packed_path(tiny_model):
    assert can_pack(add_lora(tiny_model, TrainConfig()))


@pytest.mark.parametrize("max_tokens", [10**6, 60])  # one packed row, and several micro-batches
@pytest.mark.parametrize("short_row", [512, 0])  # matmul attention for short rows, SDPA's flash kernel
def test_packed_loss_and_grads_equal_plain_peft_in_fp32(tiny_model, tiny_tokenizer, rows, max_tokens, short_row,
                                                        monkeypatch):
    import tell.packing
    monkeypatch.setattr(tell.packing, "SHORT_ROW", {"bf16": short_row, "fp32": short_row})
    model = lora_model(tiny_model)
    reference = plain_peft_loss(model, rows, tiny_tokenizer.pad_token_id)
    reference.backward()
    expected = lora_grads(model)
    model.zero_grad()
    got = tell_loss(model, rows, max_tokens=max_tokens)
    got.backward()
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5 * expected[name].abs().max().item(),
                                   msg=name)  # fp32 summation order differs between attention kernels


def test_bf16_loss_equals_plain_peft_loss_within_bf16_tolerance(tiny_model, tiny_model_dir, tiny_tokenizer, rows):
    from tell.config import ModelConfig
    from tell.model import load_model
    reference_model = lora_model(load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))[0])
    with torch.no_grad():
        reference = plain_peft_loss(reference_model, rows, tiny_tokenizer.pad_token_id)
        model = lora_model(tiny_model, torch.bfloat16)  # frozen base in bf16, LoRA in fp32, as train_lora does
        got = tell_loss(model, rows, autocast=torch.bfloat16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=2e-2, atol=0)


def test_packed_micro_batches_cover_the_batch_within_the_token_limit(rows):
    for max_tokens in (1, 50, 200, 10**6):
        groups = packed_micro_batches(rows, max_tokens)
        assert sorted(id(r) for g in groups for r in g) == sorted(id(r) for r in rows)
        for group in groups:
            assert sum(len(r.input_ids) for r in group) <= max_tokens or len(group) == 1
    assert len(packed_micro_batches(rows, 10**6)) == 1
    assert len(micro_batches(rows, 10**6)) == 1


def test_packed_rows_never_attend_across_rows(tiny_model, rows):
    """A row's loss is the same packed after another row as packed alone."""
    model = lora_model(tiny_model)
    with torch.no_grad():
        alone, _ = token_losses(model, collate_packed(rows[1:2], torch.device("cpu")))
        packed, row_of = token_losses(model, collate_packed(rows[:2], torch.device("cpu")))
    torch.testing.assert_close(packed[row_of == 1], alone, rtol=0, atol=1e-5)


def test_sparse_dropout_has_nn_dropouts_distribution():
    torch.manual_seed(0)
    layer, x = SparseDropout(0.05), torch.ones(400_000)
    out = layer.train()(x)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.002  # 6 standard deviations of a Bernoulli(0.05) mean over 4e5 draws
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / 0.95))
    assert torch.equal(layer.eval()(x), x)


def test_add_lora_uses_sparse_dropout_and_fused_layers(tiny_model):
    model = add_lora(tiny_model, TrainConfig())
    kinds = {type(m).__name__ for m in model.modules()}
    assert "SparseDropout" in kinds and "Dropout" not in kinds
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all("forward" in m.__dict__ for m in lora_layers)


def _lora_linear(bias: bool, p: float):
    """Return a PEFT LoRA layer around a Linear(12 → 10), B non-zero, routed through the fused forward."""
    from peft import LoraConfig, inject_adapter_in_model
    from tell.fused_lora import fuse_lora_layers
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(12, 10, bias=bias)
    holder = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["proj"]), holder)
    holder.proj.lora_B["default"].weight.data.normal_(0, 0.3)
    for param in holder.proj.base_layer.parameters():
        param.requires_grad_(False)
    assert fuse_lora_layers(holder) == 1
    return holder.proj


@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_layer_equals_the_lora_formula_with_its_dropped_positions(bias, monkeypatch):
    """Output and gradients (x, A, B) of the fused layer in training equal base(x) + s·B A (x·mask/(1−p))
    for the positions it drops; p = 0.3 so that many are dropped."""
    import tell.fused_lora
    layer = _lora_linear(bias, 0.3).train()
    x = torch.randn(2, 7, 12, requires_grad=True)
    dropped = torch.tensor([0, 5, 13, 50, 51, 140, 167])
    monkeypatch.setattr(tell.fused_lora, "dropped_positions", lambda numel, p, device: dropped)
    got = layer(x)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (x, layer.lora_A["default"].weight,
                                                          layer.lora_B["default"].weight))
    keep = torch.ones(x.numel())
    keep[dropped] = 0
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + (x * keep.view(x.shape) / 0.7) @ a.T @ b.T * layer.scaling["default"]
    expected_grads = torch.autograd.grad((expected * weights).sum(), (x, a, b))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_fused_lora_layer_equals_pefts_forward_in_eval_and_leaves_merged_layers_to_peft():
    layer = _lora_linear(True, 0.1).eval()
    x = torch.randn(3, 12)
    fused = layer(x)
    with pefts_own_forward(layer):
        torch.testing.assert_close(fused, layer(x), rtol=1e-5, atol=1e-6)
    layer.merge()
    torch.testing.assert_close(layer(x), fused, rtol=1e-5, atol=1e-5)  # merged: PEFT's path, base only


def test_fused_lora_layer_with_a_trainable_base_bias_runs_pefts_forward():
    """The fused backward gives the base layer no gradient, so a layer whose bias trains (LoRA bias="all")
    must keep PEFT's forward."""
    layer = _lora_linear(True, 0.0).train()
    layer.base_layer.bias.requires_grad_(True)
    layer(torch.randn(3, 12)).sum().backward()
    assert layer.base_layer.bias.grad is not None and layer.base_layer.bias.grad.abs().sum() > 0


def test_fused_lora_output_takes_in_place_ops_and_transposed_inputs_with_dropout():
    layer = _lora_linear(False, 0.3).train()
    x = torch.randn(12, 5).T.requires_grad_()  # (5, 12), not contiguous
    out = layer(x)
    out.mul_(2)  # a custom Function's view output would refuse this
    out.sum().backward()
    assert x.grad.shape == (5, 12) and torch.isfinite(x.grad).all()
    assert layer(torch.randn(0, 12)).shape == (0, 10)


def test_fused_lora_dropout_has_nn_dropouts_distribution():
    from tell.fused_lora import dropped_positions
    torch.manual_seed(0)
    hit = torch.zeros(400_000)
    hit[dropped_positions(hit.numel(), 0.05, "cpu")] = 1
    assert abs(hit.mean().item() - 0.05) < 0.002  # 6 standard deviations, as for SparseDropout
    assert dropped_positions(10, 0.0, "cpu") is None


def test_chunked_head_cross_entropy_equals_the_plain_loss_and_gradient(monkeypatch):
    from tell.packing import _HeadCrossEntropy
    monkeypatch.setattr(_HeadCrossEntropy, "CHUNK", 7)  # several chunks and a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight, targets, scale = torch.randn(50, 16), torch.randint(50, (30,)), torch.rand(30)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none")
    (expected * scale).sum().backward()
    expected_grad, hidden.grad = hidden.grad, None
    got = _HeadCrossEntropy.apply(hidden, weight, targets)
    (got * scale).sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=1e-5, atol=1e-6)



def test_chunked_head_keeps_the_gradient_of_confident_tokens_in_bf16():
    """In bf16, p − 1 for a token predicted with p ≈ 0.9995 must not round to 0 (p itself rounds to 1)."""
    from tell.packing import _HeadCrossEntropy
    torch.manual_seed(0)
    weight = torch.randn(50, 16)
    targets = torch.randint(50, (8,))
    hidden = (weight[targets] * 3.0).requires_grad_()  # the target's logit far above the others
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none")
    expected.sum().backward()
    expected_grad, hidden.grad = hidden.grad, None
    assert expected.min() < 1e-3  # confident enough that bf16 would round p to 1
    got = _HeadCrossEntropy.apply(hidden.bfloat16(), weight.bfloat16(), targets)
    grad, = torch.autograd.grad(got.sum(), hidden)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected_grad, rtol=0.05, atol=expected_grad.abs().max().item() * 0.05)

def test_causal_bias_cache_stays_under_its_byte_cap(monkeypatch):
    import tell.packing
    from collections import OrderedDict
    monkeypatch.setattr(tell.packing, "_BIASES", OrderedDict())
    monkeypatch.setattr(tell.packing, "BIAS_CACHE_BYTES", 3 * 100 * 100 * 4)
    first = tell.packing._causal_bias(100, 3, torch.float32, "cpu")
    for seq in range(20, 100):
        bias = tell.packing._causal_bias(seq, 3, torch.float32, "cpu")
        assert bias.shape == (3 * seq, seq) and bias[seq + 1, 1] == 0 and bias[seq + 1, 2] == float("-inf")
        kept = sum(b.numel() * b.element_size() for b in tell.packing._BIASES.values())
        assert kept <= tell.packing.BIAS_CACHE_BYTES
    assert tell.packing._causal_bias(99, 3, torch.float32, "cpu") is bias  # the latest stays cached
    assert (tell.packing._causal_bias(100, 3, torch.float32, "cpu") == first).all()


def test_matmul_causal_attention_equals_sdpa_with_grouped_query_heads():
    """The short-row training attention (query heads stacked per KV head, no K/V repeat, scale and mask in
    one baddbmm) gives causal SDPA's output and gradients for grouped-query attention, in fp32; the inputs
    are transposed views, as in the model."""
    import torch.nn.functional as F
    from tell.packing import _matmul_causal_attention
    torch.manual_seed(0)
    query = torch.randn(1, 9, 6, 8).transpose(1, 2).requires_grad_()
    key = torch.randn(1, 9, 2, 8).transpose(1, 2).requires_grad_()
    value = torch.randn(1, 9, 2, 8).transpose(1, 2).requires_grad_()
    mine = _matmul_causal_attention(query, key, value, 0.35)
    ref = F.scaled_dot_product_attention(query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1),
                                         is_causal=True, scale=0.35).transpose(1, 2)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((mine * weights).sum(), (query, key, value))
    expected = torch.autograd.grad((ref * weights).sum(), (query, key, value))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_collate_packed_gives_the_labelled_positions_on_the_host(rows):
    """label_positions/targets/rows, built on the host, are exactly the shifted labels of the packed row."""
    batch = collate_packed(rows[:5], torch.device("cpu"))
    labels = batch["labels"][0]
    shifted = torch.cat([labels[1:], labels.new_full((1,), -100)])
    where = (shifted != -100).nonzero().squeeze(1)
    assert torch.equal(batch["label_positions"], where)
    assert torch.equal(batch["label_targets"], shifted[where])
    edges = batch["row_edges"]
    assert edges == tuple(batch["cu_seq_lens_q"].tolist()) and edges[-1] == labels.numel()
    expected_rows = torch.bucketize(where, torch.tensor(edges[1:]), right=True)
    assert torch.equal(batch["label_rows"], expected_rows)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_padded_attention_of_the_cuda_path_equals_the_cpu_per_row_path(tiny_model, rows, monkeypatch, dropout):
    """On CUDA the packed rows run as one right-padded causal SDPA call; forced onto the CPU here, its loss
    and LoRA gradients equal the per-row kernels' (rows of different lengths, several micro-batches)."""
    import tell.packing
    model = lora_model(tiny_model, dropout=dropout).train()
    assert {m.p for m in model.modules() if hasattr(m, "p")} == ({dropout} if dropout else set())  # LoRA dropout
    results = []
    for devices in ((), ("cpu",)):
        monkeypatch.setattr(tell.packing, "PADDED_ATTENTION_DEVICES", devices)
        model.zero_grad()
        torch.manual_seed(3)  # the same LoRA dropout draws in both runs
        loss = tell_loss(model, rows, max_tokens=120)
        loss.backward()
        results.append((loss.detach(), lora_grads(model)))
    (per_row, per_row_grads), (padded, padded_grads) = results
    torch.testing.assert_close(padded, per_row, rtol=0, atol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(grad, per_row_grads[name], rtol=1e-4,
                                   atol=1e-5 * per_row_grads[name].abs().max().item(), msg=name)


def test_packed_and_padded_batches_label_every_assistant_turn_alike(tiny_tokenizer):
    chat = load_examples(FIXTURES / "chat.jsonl", "task")
    rows = training_rows(tiny_tokenizer, build_mix(chat, [], MixConfig(mode="sft"), tiny_tokenizer, 512), 512)
    assert any(len(r.label_spans) > 1 for r in rows)  # a multi-turn chat row: labels on each of its answers
    padded = collate(rows, tiny_tokenizer.pad_token_id, torch.device("cpu"))["labels"]
    packed = collate_packed(rows, torch.device("cpu"))["labels"][0]
    assert torch.equal(packed, torch.cat([padded[i, :len(r.input_ids)] for i, r in enumerate(rows)]))
    for i, r in enumerate(rows):
        assert int((padded[i] != -100).sum()) == sum(min(b, len(r.input_ids)) - max(a, 1) for a, b in r.label_spans)


@pytest.mark.parametrize("proc,files,cores", [
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 2),                       # v2, in a cgroup namespace
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    ("0::/\n", {"cpu.max": ""}, None),                                    # empty: no quota, no crash
    ("0::/system.slice/job.scope\n", {"system.slice/job.scope/cpu.max": "max 100000\n",
                                      "system.slice/cpu.max": "100000 100000\n"}, 1),  # a quota above the process
    ("1:cpu,cpuacct:/docker/ab\n0::/\n", {"cpu/docker/ab/cpu.cfs_quota_us": "50000\n",
                                           "cpu/docker/ab/cpu.cfs_period_us": "100000\n"}, 1),  # v1
    ("1:cpu,cpuacct:/ab\n", {"cpu,cpuacct/ab/cpu.cfs_quota_us": "300000\n",  # v1 mounted without a cpu link
                              "cpu,cpuacct/ab/cpu.cfs_period_us": "100000\n"}, 3),
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ("garbage\n0::/\n", {"cpu.max": "400000 100000\n"}, 4),             # a malformed line stops nothing
    ("0::/../elsewhere\n", {"cpu.max": "200000 100000\n", "elsewhere/cpu.max": "100000 100000\n"}, 2),
    (None, {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # no /proc file
    ("", {}, None)])
def test_usable_cores_is_capped_by_a_cgroup_cpu_quota(tmp_path, monkeypatch, proc, files, cores):
    import os
    from tell.hardware import usable_cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a many-core host
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    if proc is not None:
        (tmp_path / "proc-cgroup").write_text(proc)
    expected = cores or 64
    assert usable_cores(str(root), str(tmp_path / "proc-cgroup")) == expected


@pytest.mark.parametrize("omp,quota,expected", [("", 1, 1), ("", 8, 2), ("2", 1, 2)])
def test_threads_follow_the_quota_unless_the_user_set_them(monkeypatch, omp, quota, expected):
    import torch
    from tell import hardware
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(hardware, "usable_cores", lambda: quota)
    try:
        torch.set_num_threads(2)
        hardware.cap_threads_to_usable_cores()
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("flags,native,label", [
    (["avx2", "avx512f", "avx512_bf16"], True, "avx512_bf16 (native bf16)"),
    (["avx2", "avx512f", "amx_bf16"], True, "amx_bf16 (native bf16)"),
    (["avx2", "avx512f"], False, "avx512 without bf16"),
    (["avx2"], False, "avx2-only (no native bf16)"),
    ([], False, "no avx2")])
def test_the_cpu_label_names_each_kind(monkeypatch, flags, native, label):
    from tell import hardware
    monkeypatch.setattr(hardware, "cpu_kind", lambda: {"flags": flags, "native_bf16": native})
    assert hardware.cpu_label() == label
