"""Tests of tell.select on the tiny model: embeddings with a reused shared prefix equal a plain forward pass;
on hand-made rows in well-separated groups kcenter and kmeans take one row per group while random does not
reliably; a seed gives the same choice; the embedding cache is hit on a second run; k-center covers the pool
at least as well as random; `tell select` end to end (rows written as the pool held them, selection.json, the
map); bad requests stop before any model loads with file and field, exit 2 and nothing written; and the
selection inside `tell train`, `tell compare` and a sweep grid."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tell import cli, embed, generate, select
from tell.config import ModelConfig, SelectConfig
from tell.data import TellInputError
from tell.tasks import seeded_sample

FIXTURES = Path(__file__).parent / "fixtures"
GROUP_WORDS = (["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "pear"],
               ["1", "2", "3", "4", "5", "6", "7", "8", "9"],
               ["def", "return", "import", "class", "for", "while", "if", "else"],
               ["!!", "??", "...", ";;", "::", "--", "++", "**"])
ROWS_PER_GROUP = 6


def group_rows(path: Path) -> Path:
    """Write 4 groups x 6 rows (each row: 40 seeded words of its group's vocabulary) with extra fields."""
    rng = random.Random(0)
    lines = []
    for g, words in enumerate(GROUP_WORDS):
        for r in range(ROWS_PER_GROUP):
            prompt = " ".join(rng.choice(words) for _ in range(40))
            lines.append(json.dumps({"prompt": prompt, "response": f"g{g}", "group": g, "note": f"row {r} é"},
                                    ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def groups_of(indices) -> set[int]:
    return {i // ROWS_PER_GROUP for i in indices}


@pytest.fixture
def model_cfg(tiny_model_dir) -> ModelConfig:
    return ModelConfig(name=str(tiny_model_dir), device="cpu")


def test_shared_prefix_embeddings_equal_a_plain_forward(tiny_model, tiny_tokenizer):
    prefix = "Read the text below and say which group it belongs to, with care and in one word. " * 2
    texts = [prefix + tail for tail in ("apple banana", "1 2 3 4 5 6 7", "def return", "!! ?? ... ;; :: -- ++")]
    for layer, pool in ((-1, "mean"), (1, "mean"), (-1, "last"), (0, "mean")):
        fast = embed.hidden_states(tiny_model, tiny_tokenizer, texts, layer, pool, batch_size=3)
        for text, vector in zip(texts, fast):
            ids = torch.tensor([tiny_tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                out = tiny_model.base_model(input_ids=ids, output_hidden_states=True)
            states = out.hidden_states[2 if layer < 0 else layer][0]
            expected = states[-1] if pool == "last" else states.mean(0)
            assert np.allclose(vector, expected.numpy(), atol=1e-5), (layer, pool, text)
    assert generate.common_prefix_length([tiny_tokenizer(t)["input_ids"] for t in texts]) >= embed.MIN_PREFIX_TOKENS


def test_kcenter_and_kmeans_take_one_row_per_group_and_random_does_not(tmp_path, model_cfg):
    pool = select.read_pool(str(group_rows(tmp_path / "groups.jsonl")))
    picks = {}
    for method in ("kcenter", "kmeans", "random"):
        picks[method] = [select.choose_rows(pool, method, 4, 0, SelectConfig(seed=seed), model_cfg).indices
                         for seed in range(10)]
    for method in ("kcenter", "kmeans"):
        assert all(groups_of(chosen) == {0, 1, 2, 3} for chosen in picks[method]), method
    # random k=4 of 4 x 6 rows covers every group with probability 6^4 / C(24, 4) = 12%
    assert sum(groups_of(chosen) == {0, 1, 2, 3} for chosen in picks["random"]) <= 3
    assert len(set(picks["random"])) > 1  # the seed matters to the control


def test_same_seed_same_choice_and_the_cache_is_hit(tmp_path, model_cfg, monkeypatch):
    monkeypatch.setenv("TELL_CACHE", str(tmp_path / "cache"))  # other tests embedded these rows already
    pool = select.read_pool(str(group_rows(tmp_path / "groups.jsonl")))
    first = select.choose_rows(pool, "kmeans", 4, 0, SelectConfig(seed=3), model_cfg)
    assert first.record["embedding_cache"] == "miss"

    def no_forward(*args, **kwargs):
        raise AssertionError("embeddings recomputed despite the cache")

    monkeypatch.setattr(embed, "hidden_states", no_forward)
    second = select.choose_rows(pool, "kmeans", 4, 0, SelectConfig(seed=3), model_cfg)
    assert second.record["embedding_cache"] == "hit"
    assert second.indices == first.indices and np.array_equal(second.vectors, first.vectors)
    again = select.choose_rows(pool, "kcenter", 4, 0, SelectConfig(seed=3), model_cfg)  # same vectors, no forward
    assert again.record["embedding_cache_key"] == first.record["embedding_cache_key"]
    changed = tmp_path / "changed.jsonl"
    changed.write_text((tmp_path / "groups.jsonl").read_text(encoding="utf-8").replace("apple", "plum", 1),
                       encoding="utf-8")
    with pytest.raises(AssertionError, match="recomputed"):  # another pool content is another key
        select.choose_rows(select.read_pool(str(changed)), "kmeans", 4, 0, SelectConfig(seed=3), model_cfg)


def test_the_methods_on_fixed_vectors():
    rng = np.random.default_rng(0)
    centres = np.eye(5)[:, :5] * 10
    vectors = np.concatenate([c + rng.normal(0, 0.1, (8, 5)) for c in centres])
    assert groups_of_8(select.choose(vectors, "kcenter", 0, k=5)) == set(range(5))
    assert groups_of_8(select.choose(vectors, "kmeans", 0, k=5)) == set(range(5))
    assert select.choose(vectors, "random", 7, k=5) == seeded_sample(list(range(40)), 5, 7)  # = the plain draw
    spread = rng.normal(0, 1, (60, 5))  # no groups: what is chosen depends on the seed, and only on it
    for method in select.METHODS:
        assert select.choose(spread, method, 1, k=6) == select.choose(spread, method, 1, k=6), method
        assert len({tuple(select.choose(spread, method, seed, k=6)) for seed in range(4)}) > 1, method
    tokens = [10 + i for i in range(40)]
    for method in select.METHODS:
        chosen = select.choose(vectors, method, 0, budget=120, row_tokens=tokens)
        assert sum(tokens[i] for i in chosen) <= 120 and chosen == sorted(chosen)
        assert min(tokens[i] for i in range(40) if i not in chosen) > 120 - sum(tokens[i] for i in chosen) \
            or method == "kmeans"  # kcenter and random fill the budget until no row fits
    record = select.coverage(vectors, select.choose(vectors, "kcenter", 0, k=5))
    assert sum(record["cluster_sizes"]) == 40 and sorted(record["cluster_sizes"]) == [8] * 5
    assert record["coverage_radius"] < 1.0  # every row is within its group's spread of a chosen row


def groups_of_8(indices) -> set[int]:
    return {i // 8 for i in indices}


def test_kcenter_covers_the_pool_at_least_as_well_as_random(tmp_path, model_cfg):
    """On the grouped pool and on 40 Alpaca rows (no groups) k-center's radius is at most the median of 10
    random draws' (seeds 0-9), and always within 2x of any draw's (Gonzalez 1985: greedy k-center is within 2x
    of the best radius). The best of many random draws can cover a small pool better than greedy k-center
    (measured on the grouped pool, k 4, k-center seed 1: 0.756 against the best draw's 0.707)."""
    pools = {"groups": select.read_pool(str(group_rows(tmp_path / "groups.jsonl"))),
             "general": select.read_pool(str(FIXTURES / "general.jsonl"))}
    for name, pool in pools.items():
        for k in (4, 8):
            for kseed in (0, 1):
                radius = select.choose_rows(pool, "kcenter", k, 0, SelectConfig(seed=kseed),
                                            model_cfg).record["coverage_radius"]
                others = [select.choose_rows(pool, "random", k, 0, SelectConfig(seed=seed), model_cfg)
                          .record["coverage_radius"] for seed in range(10)]
                assert radius <= np.median(others), (name, k, kseed)
                assert radius <= 2 * min(others)


def test_select_cli_writes_the_pool_rows_as_they_were(tmp_path, tiny_model_dir):
    pool = group_rows(tmp_path / "groups.jsonl")
    out = tmp_path / "out" / "selected.jsonl"
    args = ["select", "--pool", str(pool), "--k", "4", "--out", str(out), "--model", str(tiny_model_dir)]
    assert cli.main(args) == 0
    record = json.loads((out.parent / "selection.json").read_text())
    lines = pool.read_text(encoding="utf-8").splitlines()
    assert out.read_text(encoding="utf-8").splitlines() == [lines[i] for i in record["chosen_indices"]]
    assert record["chosen_indices"] == sorted(record["chosen_indices"]) and groups_of(record["chosen_indices"]) \
        == {0, 1, 2, 3}
    assert record["method"] == "kcenter" and record["seed"] == 42 and record["k"] == 4
    assert sum(record["cluster_sizes"]) == 24 and record["coverage_radius"] > 0
    assert record["chosen_lines"] == [i + 1 for i in record["chosen_indices"]]
    assert record["config"]["data"]["select_pool"] == str(pool) and record["map"] == "t-SNE"
    assert (out.parent / "selection.png").stat().st_size > 0
    assert not list(out.parent.glob("*.partial"))
    assert cli.main(args) == 2  # outputs exist
    assert cli.main(args + ["--overwrite", "--method", "random", "--seed", "5"]) == 0
    assert json.loads((out.parent / "selection.json").read_text())["chosen_indices"] == \
        seeded_sample(list(range(24)), 4, 5)


def test_select_cli_token_budget_and_a_json_list_pool(tmp_path, tiny_model_dir, tiny_tokenizer):
    from tell.mix import encode_examples
    out = tmp_path / "sel.jsonl"
    assert cli.main(["select", "--pool", str(FIXTURES / "alpaca.json"), "--tokens", "120", "--method", "kcenter",
                     "--out", str(out), "--model", str(tiny_model_dir)]) == 0
    record = json.loads((tmp_path / "selection.json").read_text())
    pool = select.read_pool(str(FIXTURES / "alpaca.json"))
    counts = [len(e.input_ids) for e in encode_examples(tiny_tokenizer, [r.example for r in pool])]
    assert record["chosen_tokens"] == sum(counts[i] for i in record["chosen_indices"]) <= 120
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    original = json.loads((FIXTURES / "alpaca.json").read_text(encoding="utf-8"))
    assert written == [original[i] for i in record["chosen_indices"]]  # every field, one row a line


def test_unlabelled_rows_can_be_chosen(tmp_path, tiny_model_dir):
    pool = tmp_path / "unlabelled.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"Question number {i}: what is {i} plus {i}?", "id": i}) + "\n"
                            for i in range(6)), encoding="utf-8")
    out = tmp_path / "to_label.jsonl"
    assert cli.main(["select", "--pool", str(pool), "--k", "2", "--out", str(out), "--model",
                     str(tiny_model_dir)]) == 0
    assert len(out.read_text().splitlines()) == 2 and "response" not in out.read_text()


@pytest.mark.parametrize("extra, needle", [
    (["--k", "25"], "select.k"),            # more rows than the pool's 24
    (["--k", "0"], "select.k"),
    (["--k", "-3"], "select.k"),
    ([], "select.k"),                       # neither --k nor --tokens
    (["--k", "2", "--tokens", "50"], "select.tokens"),
    (["--tokens", "3"], "select.tokens"),   # no row fits
    (["--tokens", "100000"], "select.tokens"),  # the whole pool fits: nothing to choose
    (["--k", "2", "--method", "kmedoids"], "data.select"),
])
def test_bad_requests_exit_2_before_the_model_loads_and_write_nothing(tmp_path, tiny_model_dir, capsys, monkeypatch,
                                                                       extra, needle):
    import tell.generate

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the request was checked")

    monkeypatch.setattr(tell.generate, "load_for_generation", no_model)
    pool = group_rows(tmp_path / "groups.jsonl")
    out = tmp_path / "out" / "selected.jsonl"
    assert cli.main(["select", "--pool", str(pool), "--out", str(out), "--model", str(tiny_model_dir)] + extra) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_pools_name_file_line_and_field(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "short", "response": "a"}) + "\n"
                    + json.dumps({"prompt": "apple banana " * 400, "response": "b"}) + "\n", encoding="utf-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{\"prompt\": 3}\n", encoding="utf-8")
    for pool, needles in ((empty, ["empty.jsonl", "empty"]), (long, ["long.jsonl:2", "context of 512"]),
                          (broken, ["broken.jsonl:2"]), (tmp_path / "missing.jsonl", ["not found"])):
        out = tmp_path / f"{pool.stem}-out.jsonl"
        assert cli.main(["select", "--pool", str(pool), "--k", "1", "--out", str(out), "--model",
                         str(tiny_model_dir)]) == 2
        err = capsys.readouterr().err
        assert all(n in err for n in needles), err
        assert not out.exists() and not (tmp_path / "selection.json").exists()
    assert cli.main(["select", "--k", "1", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "data.select_pool" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:training takes only", "ignore:warmup")
def test_train_with_select_records_the_choice_in_the_manifest(tmp_path, tiny_model_dir):
    pool = group_rows(tmp_path / "groups.jsonl")
    out = tmp_path / "run"
    assert cli.main(["train", "--task", str(pool), "--general", str(FIXTURES / "general.jsonl"), "--ratio", "1",
                     "--model", str(tiny_model_dir), "--out", str(out), "--batch-size", "4", "--max-steps", "1",
                     "--data.select", "kcenter", "--select.k", "4", "--save-every", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task_rows"] == 4 and manifest["selection"]["method"] == "kcenter"
    task_ids = sorted(json.loads(line)["id"] for line in (out / "mix.jsonl").read_text().splitlines()
                      if json.loads(line)["source"] == "task")
    assert task_ids == sorted(f"task:groups.jsonl:{i + 1}" for i in manifest["selection"]["chosen_indices"])


@pytest.mark.filterwarnings("ignore:training takes only", "ignore:warmup")
def test_compare_and_a_sweep_axis_choose_the_task_rows(tmp_path, tiny_model_dir):
    import yaml
    from tell import sweep
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": f"Say g{i % 4}.", "response": f"g{i % 4}"}) + "\n"
                            for i in range(4)), encoding="utf-8")
    pool = group_rows(tmp_path / "groups.jsonl")
    common = {"model": {"name": str(tiny_model_dir)}, "data": {"general": str(FIXTURES / "general.jsonl")},
              "eval": {"task": "mine", "test": str(test), "metric": "exact", "limit": 4, "general_rows": 0},
              "generate": {"greedy": True, "max_new_tokens": 4}, "compare": {"task_rows": 4},
              "train": {"batch_size": 4, "max_steps": 1}, "mix": {"ratio": "1"}}
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--task", "mine", "--test", str(test), "--metric", "exact", "--model",
                     str(tiny_model_dir), "--general", str(FIXTURES / "general.jsonl"), "--arms", "sft",
                     "--task-rows", "4", "--limit", "4", "--max-new-tokens", "4", "--batch-size", "4", "--ratio", "1", "--out",
                     str(out), "--data.select", "kmeans", "--data.select_pool", str(pool),
                     "--eval.general_rows", "0"]) == 0
    summary = json.loads((out / "results.json").read_text())["_summary"]
    assert summary["selection"]["method"] == "kmeans" and groups_of(summary["selection"]["chosen_indices"]) == \
        {0, 1, 2, 3}
    assert "chosen by `kmeans`" in (out / "report.md").read_text()
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**common, "out": str(tmp_path / "sw"),
                                      "data": {**common["data"], "select_pool": str(pool), "task": str(pool)},
                                      "grid": [{"method": ["sft"], "select": ["kcenter", "random"]},
                                               {"method": ["sft"]}]}), encoding="utf-8")
    base, grids = sweep.load_sweep(config)
    cells = sweep.expand_grid(base, grids)
    assert len(cells) == 3 and {c.cfg.data.select for c in cells} == {"kcenter", "random", ""}
    plain = next(c for c in cells if not c.cfg.data.select)
    assert plain.cfg.data.select_pool == ""  # no selection: its settings are reset, the key is the old one
    status = sweep.run_sweep(config)
    assert status["done"] == 3
    chosen = {json.loads((tmp_path / "sw" / "cells" / c.key / "selection.json").read_text())["method"]
              for c in cells if c.cfg.data.select}
    assert chosen == {"kcenter", "random"}
    assert "select kcenter seed 42" in (tmp_path / "sw" / "report.md").read_text()


def test_cell_keys_without_a_selection_are_unchanged():
    """The 3 cells of the selfinstruct-16 sweep, run before selection existed, keep their keys; the selection
    settings enter a key only when rows are chosen."""
    import sqlite3
    from tell import sweep
    from tell.config import config_from_dict
    db = Path(__file__).parents[1] / "docs" / "results" / "selfinstruct-16" / "sweep.sqlite"
    rows = sqlite3.connect(db).execute("SELECT key, config FROM cells").fetchall()
    assert len(rows) == 3
    for key, config in rows:
        cfg = config_from_dict(json.loads(config))
        assert sweep.cell_key(cfg) == key
        cfg.select.seed = 7
        assert sweep.cell_key(cfg) == key
        cfg.data.select = "kcenter"
        chosen = sweep.cell_key(cfg)
        assert chosen != key
        cfg.select.seed = 8
        assert sweep.cell_key(cfg) != chosen


def test_read_pool_names_and_errors(tmp_path):
    alpaca = select.read_pool("alpaca")
    assert len(alpaca) == 999 and alpaca[0].raw.startswith("{") and "\n" not in alpaca[0].raw
    assert json.loads(alpaca[0].raw) == json.loads((Path(select.BUILTIN_GENERAL["alpaca"][0])).read_text())[0]
    with pytest.raises(TellInputError, match="asked for 5 rows, but the pool has only 4"):
        select.check_request(alpaca[:4], "kcenter", 5, 0, "x.jsonl")
    with pytest.raises(TellInputError, match="data.select"):
        select.check_request(alpaca, "nearest", 5, 0, "x.jsonl")
    with pytest.raises(TellInputError, match="no rows"):
        select.check_request([], "kcenter", 1, 0, "x.jsonl")


@pytest.mark.slow
def test_real_model_embeds_halu_rows_with_the_prefix_reused():
    from tell.generate import load_for_generation
    from tell.mix import render_prompt
    pool = select.read_pool("halu-cot-json")
    assert len(pool) > 2500 and json.loads(pool[0].raw)["id"] == pool[0].example.id
    run = load_for_generation(None, ModelConfig())
    texts = [render_prompt(run.tokenizer, row.example.prompt_messages) for row in pool[:3]]
    fast = embed.hidden_states(run.model, run.tokenizer, texts, -1, "mean", batch_size=3)
    ids = torch.tensor([run.tokenizer(texts[1], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        plain = run.model.base_model(input_ids=ids).last_hidden_state[0].mean(0).float().numpy()
    assert generate.common_prefix_length([run.tokenizer(t)["input_ids"] for t in texts]) > 250
    assert np.allclose(fast[1], plain, atol=1e-3 * np.abs(plain).max())


def test_select_halu_config_expresses_the_evidence_sweep():
    """configs/select-halu.yaml: SFT and TELL on 16 rows chosen by kcenter, kmeans and random (3 seeds) at the
    strongest cell's settings, one test set of >= 48 rows; random with seed 42 is the plain seeded draw."""
    from tell import sweep
    from tell.experiment import task_from_config
    base, grids = sweep.load_sweep(Path(__file__).parents[1] / "configs" / "select-halu.yaml")
    cells = sweep.expand_grid(base, grids)
    chosen = sorted((c.cfg.compare.arms, c.cfg.data.select, c.cfg.select.seed) for c in cells)
    assert chosen == sorted((arm, method, seed) for arm in ("sft", "tell") for method, seed in
                            (("kcenter", 42), ("kmeans", 42), ("random", 42), ("random", 1), ("random", 2)))
    for c in cells:
        cfg = c.cfg
        assert (cfg.eval.task, cfg.compare.task_rows, cfg.train.lr, cfg.train.batch_size, cfg.train.warmup_ratio,
                cfg.generate.greedy) == ("halu-cot-json", 16, 1e-3, 4, 0.0, True)
        assert cfg.eval.limit >= 48 and len({(x.cfg.eval.limit, x.cfg.mix.seed, x.cfg.train.seed) for x in cells}) == 1
        if cfg.compare.arms == "tell":
            assert (str(cfg.mix.ratio), cfg.anchor.mode) == ("10", "self-instruct")
    task = task_from_config(cells[0].cfg)
    pool = task.train_examples(None, 42)
    draw = select.choose(np.zeros((len(pool), 1)), "random", 42, k=16)
    assert [pool[i].id for i in draw] == [e.id for e in task.train_examples(16, 42)]
