"""Evaluation and `tell compare` on the tiny model: greedy generation is deterministic, `tell score`
reproduces `tell eval`'s metrics from its saved generations, and compare writes every promised artifact,
reuses unchanged arms from its cache and refuses bad input before training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tell import cli
from tell.config import GenerateConfig, ModelConfig
from tell.generate import generate_texts, load_for_generation, prompt_texts
from tell.model import cache_dir

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.filterwarnings("ignore:training takes only", "ignore:warmup")


def tell(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def user_task(tmp_path_factory) -> dict[str, Path]:
    """A user task: exact-match answers, 6 training rows and 5 test rows."""
    root = tmp_path_factory.mktemp("user_task")
    train = [{"prompt": f"Say the word number {i}.", "response": f"word{i}"} for i in range(6)]
    test = [{"prompt": f"Say the word number {i}.", "response": f"word{i}"} for i in range(10, 15)]
    for name, rows in (("train", train), ("test", test)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": root / "train.jsonl", "test": root / "test.jsonl"}


def test_greedy_generation_is_deterministic(tiny_model_dir):
    run = load_for_generation(None, ModelConfig(name=str(tiny_model_dir), dtype="fp32"))
    texts = prompt_texts(run, [({"role": "user", "content": f"Tell me about item {i}."},) for i in range(5)])
    cfg = GenerateConfig(greedy=True, batch_size=2)
    first = generate_texts(run.model, run.tokenizer, texts, cfg, 12, progress=False)
    second = generate_texts(run.model, run.tokenizer, texts, cfg, 12, progress=False)
    assert first == second
    assert any(first)


def test_batched_generation_matches_one_by_one(tiny_model_dir):
    run = load_for_generation(None, ModelConfig(name=str(tiny_model_dir), dtype="fp32"))
    texts = prompt_texts(run, [({"role": "user", "content": "Hi " * (i + 1)},) for i in range(4)])
    batched = generate_texts(run.model, run.tokenizer, texts, GenerateConfig(greedy=True, batch_size=4), 8,
                             progress=False)
    single = generate_texts(run.model, run.tokenizer, texts, GenerateConfig(greedy=True, batch_size=1), 8,
                            progress=False)
    assert batched == single  # left padding must not change what the model sees


def test_eval_then_score_reproduces_metrics(tiny_model_dir, user_task, tmp_path, capsys):
    out = tmp_path / "eval"
    assert tell("eval", "--model", tiny_model_dir, "--task", "mine", "--test", user_task["test"],
                "--metric", "exact", "--greedy", "--max-new-tokens", "4", "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert metrics["n"] == len(rows) == 5
    assert {"id", "prompt", "output", "reference", "score"} <= set(rows[0])
    assert 0.0 <= metrics["exact_match"] <= 1.0
    assert tell("score", "--task", "mine", "--test", user_task["test"], "--metric", "exact",
                "--generations", out / "generations.jsonl", "--out", tmp_path / "rescored") == 0
    rescored = json.loads((tmp_path / "rescored" / "metrics.json").read_text())
    assert rescored["exact_match"] == metrics["exact_match"]
    assert rescored["ci95"] == metrics["ci95"]
    # score reads each output against its own row's reference: right answers in rows 1 and 3 of 5 give 0.4
    edited = [dict(r, output=r["reference"] if i in (1, 3) else r["reference"] + " not") for i, r in enumerate(rows)]
    (tmp_path / "edited.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    assert tell("score", "--task", "mine", "--test", user_task["test"], "--metric", "exact",
                "--generations", tmp_path / "edited.jsonl", "--out", tmp_path / "edited") == 0
    assert json.loads((tmp_path / "edited" / "metrics.json").read_text())["exact_match"] == pytest.approx(0.4)
    # the diagnostics too: a plain model has an empty anchor (anchor.txt beside the generations) and no targets
    diagnostics = ("majority_baseline", "predicted_label_counts", "distinct_output_fraction", "anchor_copy_rate")
    assert {k: rescored[k] for k in diagnostics} == {k: metrics[k] for k in diagnostics}
    assert metrics["majority_baseline"] == pytest.approx(1 / 5)  # five different words, one each
    assert sum(metrics["predicted_label_counts"].values()) == 5 and metrics["anchor_copy_rate"] == 0.0
    assert "target_copy_rate" not in metrics and "target_copy_rate" not in rescored
    path = metrics["compute_path"]  # which generation kernels ran, on which CPU kind
    assert path["device"] == "cpu" and path["cpu_kind"] and path["threads"] >= 1 and path["batch_size"] == 16
    assert path["prefill"].startswith("packed rows") and path["decode"].startswith("cached matmul attention")


def test_diagnostics_of_a_trained_run_in_eval_and_score(tiny_model_dir, user_task, tmp_path):
    anchor = "Answer with the single word that the question asks for, nothing else at all."
    train = tmp_path / "train.jsonl"  # answers long enough to be copied (a span is 8 words)
    train.write_text("".join(json.dumps({"prompt": f"Say word {i}.", "response": f"The word you want is word{i}, "
                                         "and nothing else follows it."}) + "\n" for i in range(4)))
    run = tmp_path / "run"
    assert tell("train", "--task", train, "--general", FIXTURES / "general.jsonl", "--model",
                tiny_model_dir, "--anchor", anchor, "--ratio", 1, "--batch-size", 4, "--max-steps", 1,
                "--out", run) == 0
    assert tell("eval", "--run", run, "--task", "mine", "--test", user_task["test"], "--metric", "exact",
                "--greedy", "--max-new-tokens", 4) == 0
    evaluated = json.loads((run / "eval-mine" / "metrics.json").read_text())
    assert evaluated["anchor_copy_rate"] == 0.0 and evaluated["target_copy_rate"] == 0.0  # 4 new tokens
    # `tell score` finds the run one level up and recomputes the same numbers
    assert tell("score", "--task", "mine", "--test", user_task["test"], "--metric", "exact", "--generations",
                run / "eval-mine" / "generations.jsonl", "--out", tmp_path / "again") == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    keys = ("majority_baseline", "predicted_label_counts", "distinct_output_fraction", "anchor_copy_rate",
            "target_copy_rate")
    assert {k: again[k] for k in keys} == {k: evaluated[k] for k in keys}
    # hand-made outputs: one repeats 8 words of the anchor, one 8 words of a training target
    target = "Well: the word you want is word2, and nothing."
    gens = tmp_path / "elsewhere" / "g.jsonl"
    gens.parent.mkdir()
    rows = [("Sure: answer with the single word that the question asks for", "word10"), (target, "word11"),
            ("word12", "word12"), ("word12", "word13")]
    gens.write_text("".join(json.dumps({"output": o, "reference": r}) + "\n" for o, r in rows))
    assert tell("score", "--task", "mine", "--test", user_task["test"], "--metric", "exact", "--generations",
                gens, "--run", run, "--out", tmp_path / "hand") == 0
    hand = json.loads((tmp_path / "hand" / "metrics.json").read_text())
    assert hand["anchor_copy_rate"] == pytest.approx(1 / 4) and hand["target_copy_rate"] == pytest.approx(1 / 4)
    assert hand["exact_match"] == pytest.approx(1 / 4)  # "word12" answers its own row only
    assert hand["distinct_output_fraction"] == pytest.approx(3 / 4)
    assert hand["predicted_label_counts"] == {"word10": 0, "word11": 0, "word12": 2, "word13": 0, "none": 2}
    assert hand["majority_baseline"] == pytest.approx(1 / 4)


def test_score_recomputes_halu_metrics_without_a_model(tmp_path):
    gens = tmp_path / "g.jsonl"
    rows = [{"output": '{"thought": "fine", "hallucination": "no"}', "reference": "no"},
            {"output": 'Sure: {"thought": "bad", "hallucination": "yes"} done', "reference": "no"},
            {"output": "no json here", "reference": "yes"}]
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tell("score", "--task", "halu-cot-json", "--generations", gens, "--out", tmp_path / "m") == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["json_adherence_strict"] == pytest.approx(1 / 3)
    assert metrics["json_adherence_lenient"] == pytest.approx(2 / 3)
    assert metrics["label_accuracy"] == pytest.approx(1 / 3)


def test_score_names_file_and_line_of_a_bad_row(tmp_path, capsys):
    gens = tmp_path / "g.jsonl"
    gens.write_text(json.dumps({"output": "x", "reference": "no"}) + "\n" + json.dumps({"output": "y"}) + "\n")
    assert tell("score", "--task", "halu-cot-json", "--generations", gens) == 2
    err = capsys.readouterr().err
    assert "g.jsonl:2" in err and "reference" in err


def _compare_args(tiny_model_dir, user_task, out, arms="base,base-anchor,sft,sft-matched,tell,general"):
    return ["compare", "--model", tiny_model_dir, "--task", "mine", "--test", user_task["test"],
            "--train", user_task["train"], "--metric", "exact", "--general", FIXTURES / "general.jsonl",
            "--task-rows", 4, "--ratio", 2, "--batch-size", 2, "--arms", arms, "--limit", 0,
            "--max-new-tokens", 3, "--greedy", "--out", out]


def test_compare_writes_report_results_and_chart(tiny_model_dir, user_task, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert tell(*_compare_args(tiny_model_dir, user_task, out)) == 0
    for name in ("report.md", "results.json", "compare.png", "config.yaml"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    arms = ("base", "base-anchor", "sft", "sft-matched", "tell", "general")
    assert set(arms) <= set(results)
    for arm in arms:
        assert 0.0 <= results[arm]["exact_match"] <= 1.0
        assert results[arm]["n"] == 5
    assert results["base"]["optimizer_steps"] == 0
    # sft-matched repeats the task rows for as many optimizer steps as TELL takes
    assert results["sft-matched"]["optimizer_steps"] == results["tell"]["optimizer_steps"]
    assert results["sft"]["optimizer_steps"] == 2  # 4 rows, batch 2, one epoch
    assert results["general"]["task_tokens"] == 0 and results["general"]["general_tokens"] > 0
    assert results["tell"]["general_tokens"] == results["general"]["general_tokens"]
    assert "| tell |" in (out / "report.md").read_text()
    # every arm reports what it cost on held-out general rows (DPO-demo answers, not in the general pool)
    from tell.compare import DEFAULTS  # compare's own default: 16 held-out rows
    assert all(results[arm]["general_loss"] > 0 and results[arm]["general_loss_rows"] == DEFAULTS["eval.general_rows"]
               for arm in arms)
    assert "Held-out general rows" in (out / "report.md").read_text()
    # diagnostics: every arm; target copies only where the arm trained on task rows
    for arm in arms:
        m = results[arm]
        assert sum(m["predicted_label_counts"].values()) == m["n"] and m["majority_baseline"] == pytest.approx(0.2)
        assert 0.0 <= m["distinct_output_fraction"] <= 1.0 and 0.0 <= m["anchor_copy_rate"] <= 1.0
        assert ("target_copy_rate" in m) == (arm in ("sft", "sft-matched", "tell", "general")), arm
    assert "## Judging or copying?" in (out / "report.md").read_text()


def test_compare_reuses_unchanged_arms(tiny_model_dir, user_task, tmp_path, capsys, monkeypatch):
    from tell import compare as compare_module
    from tell import evaluate as evaluate_module
    first = tmp_path / "a"
    assert tell(*_compare_args(tiny_model_dir, user_task, first, arms="base,tell")) == 0
    stages = json.loads((first / "results.json").read_text())["_summary"]["stage_wall_s"]
    cached = {kind: sorted(p.name for p in (cache_dir() / kind).iterdir()) for kind in ("runs", "evals")}
    second = tmp_path / "b"

    def recomputed(*args, **kwargs):
        raise AssertionError("a cached arm was computed again")
    for module, name in ((compare_module, "resume_or_train"), (compare_module, "run_train"),
                         (evaluate_module, "evaluate")):
        monkeypatch.setattr(module, name, recomputed)
    assert tell(*_compare_args(tiny_model_dir, user_task, second, arms="base,tell")) == 0
    again = json.loads((second / "results.json").read_text())
    first_results = json.loads((first / "results.json").read_text())
    assert again["tell"]["exact_match"] == first_results["tell"]["exact_match"]
    # a cached arm is copied, not recomputed: its generations are byte-identical and no new run dir appears
    assert (first / "evals" / "tell" / "generations.jsonl").read_bytes() == \
        (second / "evals" / "tell" / "generations.jsonl").read_bytes()
    assert set(stages) == {"prepare", "base", "tell"}
    assert cached == {kind: sorted(p.name for p in (cache_dir() / kind).iterdir()) for kind in ("runs", "evals")}


def test_a_zero_adapter_arm_is_the_base_model_evaluated_once(tiny_model_dir, user_task, tmp_path, capsys,
                                                             monkeypatch):
    """The paper's SFT (batch 16 over 4 rows: one optimizer step, at learning rate 0 in warmup) leaves every
    LoRA B matrix at 0: the arm is the base model, reported as such, and its answers are the base model's,
    generated once even with --no-cache."""
    from safetensors.torch import load_file
    from tell import evaluate as evaluate_module
    evaluated = []
    original = evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate", lambda run, *a, **k: evaluated.append(run.adapter_dir) or
                        original(run, *a, **k))
    out = tmp_path / "z"
    args = _compare_args(tiny_model_dir, user_task, out, arms="base,sft,tell")
    args[args.index("--batch-size") + 1] = 16
    args[args.index("--ratio") + 1] = "max"  # 44 rows: TELL takes 3 steps, two of them at lr > 0
    assert tell(*args, "--no-cache") == 0
    assert len(evaluated) == 2 and evaluated[0] == "" and evaluated[1].endswith("adapter")  # base, tell
    results = json.loads((out / "results.json").read_text())
    assert results["sft"]["optimizer_steps"] == 1 and "same_as_base" in results["sft"]
    assert "same_as_base" not in results["tell"] and "same_as_base" not in results["base"]
    weights = load_file(out / "runs" / "sft" / "adapter" / "adapter_model.safetensors")
    assert all(not w.any() for k, w in weights.items() if "lora_B" in k)
    assert (out / "evals" / "sft" / "generations.jsonl").read_bytes() == \
        (out / "evals" / "base" / "generations.jsonl").read_bytes()
    assert results["sft"]["general_loss"] == results["base"]["general_loss"]
    report = (out / "report.md").read_text()
    assert "| sft (= base: zero adapter) |" in report and "exactly zero" in report
    from tell.hardware import cpu_label
    assert results["_summary"]["machine"]["cpu_kind"] == cpu_label()  # where and how it computed, said
    assert "Machine: " in report and cpu_label() in report and "Training: " in report and "Generation: " in report


def test_compare_refuses_bad_input_before_training(tiny_model_dir, user_task, tmp_path, capsys):
    out = tmp_path / "bad"
    args = _compare_args(tiny_model_dir, user_task, out)
    args[args.index("--ratio") + 1] = 10_000  # the 40-row pool cannot meet it
    assert tell(*args) == 2
    assert "pool" in capsys.readouterr().err
    assert not out.exists() and not out.with_name("bad.partial").exists()
    assert tell(*_compare_args(tiny_model_dir, user_task, out, arms="base,typo")) == 2
    assert "typo" in capsys.readouterr().err


def test_general_loss_is_the_mean_answer_token_loss(tiny_model_dir, general_file):
    import math

    import torch

    from tell.data import load_examples
    from tell.evaluate import general_loss
    from tell.mix import encode_examples
    run = load_for_generation(None, ModelConfig(name=str(tiny_model_dir), dtype="fp32"))
    examples = load_examples(general_file, "general")[:5]
    values = general_loss(run.model, run.tokenizer, examples, max_batch_tokens=64)  # several batches
    assert values["general_loss_rows"] == 5 and values["general_ppl"] == pytest.approx(math.exp(values["general_loss"]), rel=1e-3)
    total, count = 0.0, 0
    for enc in encode_examples(run.tokenizer, examples):  # one row at a time, the model's own loss
        ids = torch.tensor([enc.input_ids])
        labels = ids.clone()
        labels[0, :enc.prompt_tokens] = -100
        with torch.no_grad():
            loss = run.model(input_ids=ids, labels=labels).loss
        n = len(enc.input_ids) - enc.prompt_tokens
        total, count = total + float(loss) * n, count + n
    assert values["general_loss"] == pytest.approx(total / count, rel=1e-3)
    assert values["general_loss_tokens"] == count


def test_harness_without_lm_eval_says_so(tiny_model_dir, capsys):
    try:
        import lm_eval  # noqa: F401
        pytest.skip("lm-eval is installed here")
    except ImportError:
        pass
    assert tell("eval", "--model", tiny_model_dir, "--harness", "hellaswag") == 2
    assert "lm-eval" in capsys.readouterr().err


def test_decode_loop_matches_transformers_generate(tiny_model_dir):
    """tell's decode loop (top-k sampling over candidates, finished rows leave the batch) gives the same
    greedy tokens as transformers' generate with the same repetition penalty, in fp32."""
    import torch
    from tell.generate import decode_batch, sampling_kwargs
    run = load_for_generation(None, ModelConfig(name=str(tiny_model_dir), dtype="fp32"))
    tok = run.tokenizer
    tok.padding_side = "left"
    texts = prompt_texts(run, [({"role": "user", "content": "Hi " * (i * 3 + 1)},) for i in range(5)])
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    cfg = GenerateConfig(greedy=True)
    eos = tok.eos_token_id
    with torch.inference_mode():
        ref = run.model.generate(**enc, max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=eos,
                                 **sampling_kwargs(cfg))[:, enc["input_ids"].shape[1]:].tolist()
        mine = decode_batch(run.model, enc["input_ids"], enc["attention_mask"], cfg, 10, eos)
    ref = [row[:row.index(eos) + 1] if eos in row else row for row in ref]
    assert mine == ref


def test_padding_never_counts_for_the_repetition_penalty(tiny_model_dir):
    """A left-padded row answers as it does alone, even when its pad id is the token it is about to say (a base
    model's pad id is often its EOS): the penalty reads the row's own tokens only."""
    import torch
    from tell.generate import decode_batch
    run = load_for_generation(None, ModelConfig(name=str(tiny_model_dir), dtype="fp32"))
    cfg = GenerateConfig(greedy=True, repetition_penalty=100.0)  # a penalised token is never chosen
    row, longer = torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11, 12, 13, 14, 15])
    with torch.inference_mode():
        alone = decode_batch(run.model, row[None], torch.ones(1, 4, dtype=torch.long), cfg, 3, -1)[0]
        pad = alone[0]
        assert pad not in row.tolist()
        ids = torch.stack([torch.cat([torch.full((3,), pad), row]), longer])
        mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
        padded = decode_batch(run.model, ids, mask, cfg, 3, -1)[0]
    assert padded == alone


def test_top_p_keeps_the_smallest_set_reaching_p():
    import torch
    from tell.generate import next_tokens
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = GenerateConfig(temperature=1.0, top_k=4, top_p=0.7, repetition_penalty=1.0)
    torch.manual_seed(0)
    drawn = {int(next_tokens(logits, torch.zeros((1, 1), dtype=torch.long) + 3, cfg)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the 0.15 and 0.05 tokens are cut


def test_shared_prefix_cache_changes_nothing(tiny_model_dir, monkeypatch):
    """Prompts with a long common start reuse one prefix KV cache; in fp32 the answers are identical."""
    import tell.generate as generate
    run = load_for_generation(None, ModelConfig(name=str(tiny_model_dir), dtype="fp32"))
    head = "Read the following carefully and answer in one line. " * 6
    texts = prompt_texts(run, [({"role": "user", "content": head + "x " * i + f"item {i}"},) for i in range(6)])
    cfg = GenerateConfig(greedy=True, batch_size=4)
    encoded = [run.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert generate.shared_prefix(run.model, encoded, "cpu") is not None  # the path under test is taken
    with_prefix = generate_texts(run.model, run.tokenizer, texts, cfg, 8, progress=False)
    monkeypatch.setattr(generate, "shared_prefix", lambda *args, **kwargs: None)
    without = generate_texts(run.model, run.tokenizer, texts, cfg, 8, progress=False)
    assert with_prefix == without


def test_cached_matmul_attention_equals_sdpa_with_padding_and_grouped_heads():
    """The decode attention gives SDPA's output for grouped-query heads, a left-padding mask, one query and
    up to MATMUL_MAX_QUERIES, and a value head size other than the key's, in fp32."""
    import torch
    from tell.cpu_decode import MATMUL_MAX_QUERIES, _cached_matmul_attention

    class Layer(torch.nn.Module):
        num_key_value_groups = 3
        is_causal = True

    torch.manual_seed(0)
    for q_len, value_dim in ((1, 8), (3, 8), (MATMUL_MAX_QUERIES, 8), (1, 6)):
        k_len = 11
        query = torch.randn(2, 6, q_len, 8)
        key, value = torch.randn(2, 2, k_len, 8), torch.randn(2, 2, k_len, value_dim)
        mask = torch.ones(2, 1, q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
        mask[1, :, :, :3] = False  # row 1 is left-padded by 3 tokens
        mine, _ = _cached_matmul_attention(Layer(), query, key, value, mask, scaling=0.3)
        ref = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=mask, scale=0.3)
        assert mine.shape == (2, q_len, 6, value_dim)
        torch.testing.assert_close(mine, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_generation_takes_the_matmul_attention_and_matches_transformers(tiny_model_dir, monkeypatch):
    """generate_texts routes masked attention through the matmul kernel, and its greedy answers equal
    transformers' generate (SDPA) in fp32."""
    import torch
    import tell.cpu_decode as cpu_decode
    import tell.generate as generate
    calls = []
    original = cpu_decode._cached_matmul_attention

    def counting(module, query, key, value, mask, *args, **kwargs):
        if mask is not None and query.shape[2] <= cpu_decode.MATMUL_MAX_QUERIES:  # the matmul branch, not SDPA
            calls.append(1)
        return original(module, query, key, value, mask, *args, **kwargs)
    monkeypatch.setattr(cpu_decode, "_cached_matmul_attention", counting)
    run = load_for_generation(None, ModelConfig(name=str(tiny_model_dir), dtype="fp32"))
    tok = run.tokenizer
    texts = prompt_texts(run, [({"role": "user", "content": "Tell me " * (i * 2 + 1)},) for i in range(4)])
    mine = generate_texts(run.model, tok, texts, GenerateConfig(greedy=True, batch_size=4), 10, progress=False)
    assert calls, "the matmul attention was not used"
    assert run.model.config._attn_implementation == "sdpa"  # restored afterwards
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = run.model.generate(**enc, max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 **generate.sampling_kwargs(GenerateConfig(greedy=True)))
    ref = [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]
    assert mine == ref


def test_growing_cache_gives_the_default_cache_logits(tiny_model_dir, monkeypatch):
    """The KV cache with spare capacity (past its capacity, after rows leave and after a batch repeat)
    gives the same logits as transformers' DynamicCache in fp32, as the decode loop calls the model (with
    a 2D mask) and, under cached_attention, without one."""
    import torch
    from transformers.cache_utils import DynamicCache
    import tell.cpu_decode as generate
    run = load_for_generation(None, ModelConfig(name=str(tiny_model_dir), dtype="fp32"))
    model = run.model
    for with_mask in (True, False):
        growing = generate.new_cache(model)
        monkeypatch.setattr(growing.layer_class_to_replicate, "SPARE", 2)  # grow several times within the test
        default = DynamicCache()
        torch.manual_seed(0)
        ids = torch.randint(5, 200, (1, 7))
        mask = torch.ones(3, 7, dtype=torch.long)
        with torch.inference_mode(), generate.cached_attention(model):
            a = model(input_ids=ids, cache=growing, use_cache=True).logits
            b = model(input_ids=ids, cache=default, use_cache=True).logits
            growing.batch_repeat_interleave(3)
            default.batch_repeat_interleave(3)
            for step in range(5):
                if step == 3:
                    growing.batch_select_indices(torch.tensor([0, 2]))
                    default.batch_select_indices(torch.tensor([0, 2]))
                    mask = mask[:2]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                token = torch.randint(5, 200, (mask.shape[0], 1))
                kwargs = {"attention_mask": mask} if with_mask else {}
                a = model(input_ids=token, cache=growing, use_cache=True, **kwargs).logits
                b = model(input_ids=token, cache=default, use_cache=True, **kwargs).logits
                torch.testing.assert_close(a, b)
        assert type(growing.layers[0]).__name__ == "GrowingLayer"
        assert growing.get_seq_length() == default.get_seq_length() == 12
        assert growing.layers[0].keys.shape[-2] > 12  # spare slots exist and were masked


def test_grouped_query_model_generates_as_transformers(tiny_model_dir):
    """A model with grouped-query heads (2 KV heads for 4 query heads) and one-token prompts: the
    decode path (matmul attention, spare-capacity cache) gives transformers' greedy answers in fp32."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import tell.generate as generate
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, initializer_range=0.3)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    cfg = GenerateConfig(greedy=True)
    for prompts in ([[5], [9]], [[5, 6, 7], [8, 9], [10, 11, 12, 13]]):
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            with generate.cached_attention(model):
                mine = generate.decode_batch(model, ids, mask, cfg, 6, tok.eos_token_id)
            ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **generate.sampling_kwargs(cfg))[:, width:].tolist()
        ref = [row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row for row in ref]
        assert mine == ref


def test_shared_prefix_decode_attention_equals_sdpa_over_the_whole_cache():
    """Decode attention with the prefix kept once for all rows (GrowingLayer.prefix) gives SDPA's output over
    each row's full cache (prefix repeated, left padding after it), for grouped-query heads, in fp32."""
    import torch
    from tell.cpu_decode import MATMUL_MAX_QUERIES, _cached_matmul_attention

    class Layer(torch.nn.Module):
        num_key_value_groups = 3
        is_causal = True

    torch.manual_seed(0)
    prefix_length, row_length = 7, 5
    for q_len in (1, MATMUL_MAX_QUERIES):
        query = torch.randn(3, 6, q_len, 8)
        prefix = (torch.randn(1, 2, prefix_length, 8), torch.randn(1, 2, prefix_length, 8))
        key, value = torch.randn(3, 2, row_length, 8), torch.randn(3, 2, row_length, 8)
        mask = torch.ones(3, 1, q_len, prefix_length + row_length, dtype=torch.bool)
        mask[:, :, :, prefix_length + row_length - q_len:] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
        mask[1, :, :, prefix_length:prefix_length + 2] = False  # row 1 is padded between prefix and its tokens
        whole_key = torch.cat([prefix[0].expand(3, -1, -1, -1), key], 2)
        whole_value = torch.cat([prefix[1].expand(3, -1, -1, -1), value], 2)
        key.prefix = prefix
        mine, _ = _cached_matmul_attention(Layer(), query, key, value, mask, scaling=0.3)
        ref = torch.nn.functional.scaled_dot_product_attention(
            query, whole_key.repeat_interleave(3, 1), whole_value.repeat_interleave(3, 1), attn_mask=mask, scale=0.3)
        torch.testing.assert_close(mine, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_packed_prefill_gives_the_padded_prefill_logits_and_answers(tiny_model_dir, monkeypatch):
    """Reading a batch packed (no padding computed; the shared prefix kept once) gives the left-padded
    prefill's last logits and the same greedy continuation, with and without a shared prefix, in fp32."""
    import torch
    import tell.cpu_decode as cpu_decode
    import tell.generate as generate
    run = load_for_generation(None, ModelConfig(name=str(tiny_model_dir), dtype="fp32"))
    model, tok = run.model, run.tokenizer
    cfg = GenerateConfig(greedy=True)
    torch.manual_seed(3)
    common = torch.randint(10, 900, (40,)).tolist()
    rows = [torch.randint(10, 900, (n,)).tolist() for n in (3, 11, 6)]
    for prompts in ([common + r for r in rows], rows):
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        results = {}
        for packed in (True, False):
            monkeypatch.setattr(generate, "packs", lambda m, packed=packed: packed)
            with torch.inference_mode(), cpu_decode.cached_attention(model):
                prefix = generate.shared_prefix(model, [p for p in prompts], torch.device("cpu"))
                suffix = ids if prefix is None else ids[:, prefix.length:]
                _, logits, _ = generate._prefill(model, suffix, mask[:, suffix.shape[1] * -1:], prefix)
                answers = generate.decode_batch(model, suffix, mask[:, -suffix.shape[1]:], cfg, 8, tok.eos_token_id,
                                                prefix)
            results[packed] = (logits, answers)
        assert (prefix is not None) == (prompts[0][:40] == common)
        torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-4)
        assert results[True][1] == results[False][1]
