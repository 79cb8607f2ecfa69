"""End-to-end tests of the `tell` command line, in-process on the tiny model: mix, train and generate write
what they promise, the run's anchor reaches generation, and bad input ends with exit code 2, one message
naming the file and line, and no run directory."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from tell import cli
from tell.config import config_from_dict, load_config
from tell.generate import load_for_generation, prompt_texts

FIXTURES = Path(__file__).parent / "fixtures"
ANCHOR = "Answer as a careful fact checker."
RUN_FILES = ("config.yaml", "manifest.json", "mix.jsonl", "adapter", "train_log.jsonl", "loss_curve.png",
             "train_summary.json")

pytestmark = pytest.mark.filterwarnings("ignore:training takes only", "ignore:warmup")


def tell(*argv) -> int:
    return cli.main([str(a) for a in argv])


def base_args(model_dir, out) -> list:
    return ["--task", FIXTURES / "alpaca.jsonl", "--general", FIXTURES / "general.jsonl",
            "--model", model_dir, "--out", out]


def assert_no_run_dir(out: Path) -> None:
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Return the directory of a 2-step tiny-model training run with an anchor."""
    out = tmp_path_factory.mktemp("cli") / "run"
    code = tell("train", *base_args(tiny_model_dir, out), "--ratio", "3", "--anchor", ANCHOR,
                "--max-steps", "2", "--batch-size", "4", "--train.lr", "1e-3")
    assert code == 0
    return out


def test_mix_writes_mix_manifest_and_config(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "mix"
    assert tell("mix", *base_args(tiny_model_dir, out), "--ratio", "2", "--seed", "3") == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json", "mix.jsonl"]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    said = f"[tell] mix: 3 task rows ({manifest['task_tokens']:,} tokens) + {manifest['general_rows']} general rows"
    assert said in capsys.readouterr().err  # what was mixed, before any long work
    assert (manifest["task_rows"], manifest["seed"]) == (3, 3)
    assert manifest["ratio"] == pytest.approx(2, rel=0.2)  # 3 tiny task rows: whole general rows are coarse
    rows = (out / "mix.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == manifest["task_rows"] + manifest["general_rows"]
    cfg = load_config(out / "config.yaml")
    assert (cfg.mix.ratio, cfg.mix.seed, cfg.model.name) == ("2", 3, str(tiny_model_dir))
    assert_no_run_dir(tmp_path / "mix.partial")


@pytest.mark.parametrize("shape", ["alpaca", "alpaca-json", "pair", "chat"])
def test_mix_accepts_every_row_shape(shape, task_files, tiny_model_dir, tmp_path):
    out = tmp_path / "mix"
    assert tell("mix", *base_args(tiny_model_dir, out), "--task", task_files[shape], "--mode", "sft") == 0
    rows = [json.loads(line) for line in (out / "mix.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows and all(r["source"] == "task" and r["messages"][-1]["role"] == "assistant" for r in rows)


def test_train_writes_a_complete_run_directory(run_dir):
    for name in RUN_FILES:
        assert (run_dir / name).exists(), name
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert not run_dir.with_name("run.partial").exists()
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["optimizer_steps"] == 2
    values = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    cfg = config_from_dict(values)
    assert (cfg.train.lr, cfg.train.max_steps, cfg.anchor.text) == (1e-3, 2, ANCHOR)
    assert load_config(run_dir / "config.yaml") == cfg
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["anchor"] == ANCHOR


def test_a_run_says_which_machine_dtype_and_kernels_trained_it(run_dir):
    from tell.hardware import cpu_label
    path = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["runtime"]["train"]
    assert path == json.loads((run_dir / "train_summary.json").read_text())["compute_path"]
    dtype = "fp32"  # dtype auto: fp32 on every CPU kind
    assert (path["device"], path["cpu_kind"], path["dtype"]) == ("cpu", cpu_label(), dtype)
    assert path["threads"] >= 1 and path["micro_batch_tokens"] >= 1
    assert path["attention"].startswith("packed rows") and path["lora"].startswith("fused LoRA matmuls (")


def test_generate_answers_prompts_with_the_runs_anchor(run_dir, tmp_path, capsys):
    output = tmp_path / "answers.jsonl"
    assert tell("generate", "--run", run_dir, "--prompts", FIXTURES / "prompts.jsonl", "--max-new-tokens", "3",
                "--greedy", "--output", output) == 0
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and all(isinstance(r["output"], str) for r in rows)
    assert rows[0]["prompt"] == [{"role": "user", "content": "Is the sky green?"}]
    assert tell("generate", "--run", run_dir, "--prompts", FIXTURES / "prompts.jsonl", "--max-new-tokens",
                "2", "--greedy") == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(printed) == 3

    run = load_for_generation(run_dir)
    assert run.anchor == ANCHOR
    prompt = ({"role": "user", "content": "Is the sky green?"},)
    with_anchor, without = prompt_texts(run, [prompt])[0], prompt_texts(run, [prompt], use_anchor=False)[0]
    assert f"<|im_start|>user\n{ANCHOR}\n\nIs the sky green?<|im_end|>" in with_anchor
    assert ANCHOR not in without and with_anchor.endswith("<|im_start|>assistant\n")


def test_generate_with_a_plain_model(tiny_model_dir, capsys):
    assert tell("generate", "--model", tiny_model_dir, "--prompts", FIXTURES / "prompts.jsonl",
                "--max-new-tokens", "2", "--greedy") == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]) == 3


def test_prompts_may_be_alpaca_or_chat_rows_without_an_answer():
    from tell.experiment import read_prompts
    assert read_prompts(str(FIXTURES / "prompts_alpaca_chat.jsonl")) == [
        ({"role": "user", "content": "Name a fruit."},), ({"role": "user", "content": "Hello?"},)]


def test_print_config_prints_the_resolved_config_and_writes_nothing(tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "never"
    assert tell("train", *base_args(tiny_model_dir, out), "--lr", "3e-4", "--print-config") == 0
    printed = yaml.safe_load(capfd.readouterr().out)
    assert printed["train"]["lr"] == 3e-4 and printed["out"] == str(out)
    assert_no_run_dir(out)


def bad_yaml(tmp_path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lora_rank: 16\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("case, expected", [
    ("malformed task file", ["malformed_line.jsonl:3", "malformed JSON"]),
    ("missing model path", ["/no/such/model", "model path not found"]),
    ("mistyped relative model path", ["no/such-model", "not a local path"]),
    ("unknown yaml key", ["bad.yaml:2", "did you mean 'train.lora_r'"]),
    ("impossible ratio", ["mix.ratio", "--allow-repeat"]),
])
def test_bad_input_exits_2_with_one_message_and_no_run_dir(case, expected, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = base_args(tiny_model_dir, out) + ["--max-steps", "1"]
    if case == "malformed task file":
        args += ["--task", FIXTURES / "bad" / "malformed_line.jsonl"]
    elif case == "missing model path":
        args += ["--model", "/no/such/model"]
    elif case == "mistyped relative model path":
        args += ["--model", "no/such-model"]  # reads as a hub id; offline, loading it fails
    elif case == "unknown yaml key":
        args += ["--config", bad_yaml(tmp_path)]
    elif case == "impossible ratio":
        args += ["--ratio", "100000"]
    assert tell("train", *args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, errors
    assert errors[0].startswith("tell train: error: ")
    for fragment in expected:
        assert fragment in errors[0]
    assert_no_run_dir(out)


def test_existing_out_is_kept_without_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results", encoding="utf-8")
    assert tell("mix", *base_args(tiny_model_dir, out)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and str(out) in errors[0] and "--overwrite" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not out.with_name("run.partial").exists()
    assert tell("mix", *base_args(tiny_model_dir, out), "--overwrite") == 0
    assert (out / "mix.jsonl").is_file() and not (out / "keep.txt").exists()


def verbs() -> list[str]:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(subparsers.choices)


def test_the_pipeline_verbs_exist():
    assert {"mix", "train", "generate"} <= set(verbs())


@pytest.mark.parametrize("verb", [None] + verbs())
def test_help_works_for_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([verb, "--help"] if verb else ["--help"])
    assert info.value.code == 0
    assert "usage: tell" in capsys.readouterr().out


def test_compare_has_its_own_defaults_under_yaml_and_flags(tmp_path, capsys):
    """`tell compare` starts from compare.DEFAULTS (sized for 20 min on a 2-core CPU); a YAML and flags override
    them, and the earlier default stays a preset."""
    from tell.compare import DEFAULTS
    assert tell("compare", "--print-config") == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["compare"]["task_rows"], cfg["eval"]["limit"], cfg["generate"]["batch_size"]) == (
        DEFAULTS["compare.task_rows"], DEFAULTS["eval.limit"], DEFAULTS["generate.batch_size"])
    assert (cfg["train"]["lr"], cfg["train"]["batch_size"], cfg["mix"]["ratio"]) == (1e-4, 16, "10")  # the paper's
    assert tell("compare", "--config", Path(__file__).parents[1] / "configs" / "compare-ratio10.yaml", "--limit", "7",
                "--print-config") == 0
    preset = yaml.safe_load(capsys.readouterr().out)
    assert (preset["compare"]["task_rows"], preset["eval"]["limit"], preset["generate"]["batch_size"]) == (15, 7, 16)
    assert tell("train", "--print-config") == 0  # other verbs keep RunConfig's defaults
    assert yaml.safe_load(capsys.readouterr().out)["eval"]["limit"] == 100
