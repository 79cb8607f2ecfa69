"""Tests of tell.sweep and tell.sweep_eta: grid expansion (axes, aliases, de-duplication, errors with
file:line), the SQLite store's resume rules (a done cell is never run again, a 'running' cell of a dead process
runs again, one of a live process is left alone), the status estimate, and a 2-cell sweep end to end on the tiny
model."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tell import cli, sweep, sweep_eta
from tell.data import TellInputError
from tell.sweep_report import status_text

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.filterwarnings("ignore:training takes only", "ignore:warmup")


def write_yaml(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return path


def test_grid_expands_aliases_and_drops_cells_an_arm_cannot_tell_apart(tmp_path):
    path = write_yaml(tmp_path / "s.yaml", {
        "train": {"batch_size": 2},
        "grid": {"method": ["base", "sft", "tell"], "task_rows": [2, 4], "ratio": [1, 3],
                 "anchor": ["none", "manual"], "seed": [1, 2]}})
    base, grids = sweep.load_sweep(path)
    cells = sweep.expand_grid(base, grids)
    by_arm = {arm: [c for c in cells if c.cfg.compare.arms == arm] for arm in ("base", "sft", "tell")}
    # base: no rows, ratio, anchor or training seed apply -> only the sampling seed remains (1 and 2)
    assert len(by_arm["base"]) == 2
    assert len(by_arm["sft"]) == 2 * 2  # task rows x seeds; ratio and anchor reset
    assert len(by_arm["tell"]) == 2 * 2 * 2 * 2
    assert len({c.key for c in cells}) == len(cells)
    tell = by_arm["tell"][0].cfg
    assert (tell.mix.seed, tell.train.seed, tell.generate.seed) == (1, 1, 1)  # `seed` sets every stage's
    assert tell.train.batch_size == 2  # base settings reach every cell
    assert {c.cfg.anchor.mode for c in by_arm["tell"]} == {"none", "manual"}


def test_grid_list_is_a_union_and_keys_ignore_settings_that_change_no_result(tmp_path):
    first = write_yaml(tmp_path / "a.yaml", {"grid": [{"method": ["sft"], "task_rows": [2, 4]},
                                                      {"method": ["sft"], "task_rows": [4, 8]}]})
    base, grids = sweep.load_sweep(first)
    assert [c.cfg.compare.task_rows for c in sweep.expand_grid(base, grids)] == [2, 4, 8]
    keys = [c.key for c in sweep.expand_grid(base, grids)]
    base2, grids2 = sweep.load_sweep(first, {"train.report_to": "tensorboard", "out": "elsewhere"})
    assert [c.key for c in sweep.expand_grid(base2, grids2)] == keys
    base3, grids3 = sweep.load_sweep(first, {"train.lr": "2e-4"})
    assert not set(c.key for c in sweep.expand_grid(base3, grids3)) & set(keys)


def test_grid_without_method_runs_the_base_arms(tmp_path):
    path = write_yaml(tmp_path / "s.yaml", {"compare": {"arms": "sft,tell"}, "grid": {"task_rows": [2, 4]}})
    base, grids = sweep.load_sweep(path)
    assert sorted(c.cfg.compare.arms for c in sweep.expand_grid(base, grids)) == ["sft", "sft", "tell", "tell"]


def test_bad_grids_are_refused_with_file_line_and_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("eval:\n  limit: 5\ngrid:\n  method: [tell]\n  ratoi: [1, 2]\n", encoding="utf-8")
    with pytest.raises(TellInputError, match=r"bad.yaml:5.*did you mean 'ratio'"):
        sweep.load_sweep(path)
    path.write_text("grid:\n  method: [tell, magic]\n", encoding="utf-8")
    with pytest.raises(TellInputError, match="magic"):
        sweep.expand_grid(*sweep.load_sweep(path))
    path.write_text("grid:\n  mix.order: [random, sideways]\n", encoding="utf-8")
    with pytest.raises(TellInputError, match="sideways"):
        sweep.expand_grid(*sweep.load_sweep(path))


def test_status_estimates_left_cells_from_the_default_rates(tmp_path):
    path = write_yaml(tmp_path / "s.yaml", {"out": str(tmp_path / "sw"), "eval": {"limit": 10},
                                            "grid": {"method": ["sft", "tell"], "task_rows": [2]}})
    sweep.plan_sweep(path)
    status = sweep_eta.sweep_status(tmp_path / "sw")
    assert (status["cells"], status["done"], status["left"], status["running"]) == (2, 0, 2, 0)
    rates = sweep_eta.DEFAULT_RATES
    sft_s = rates["overhead_s"] + 2 * rates["task_row_tokens"] / rates["train_tok_s"] + 10 * rates["eval_s_per_row"]
    tell_s = sft_s + 10 * 2 * rates["task_row_tokens"] / rates["train_tok_s"]  # ratio 10 more tokens
    assert status["estimate_left_s"] == pytest.approx(sft_s + tell_s, abs=1)
    assert "left: 2" in status_text(status)


def test_planning_an_unchanged_sweep_again_leaves_its_database_byte_for_byte(tmp_path):
    grid = {"method": ["sft", "tell"], "task_rows": [2]}
    path = write_yaml(tmp_path / "s.yaml", {"out": str(tmp_path / "sw"), "eval": {"limit": 10}, "grid": grid})
    sweep.plan_sweep(path)
    before = (tmp_path / "sw" / "sweep.sqlite").read_bytes()
    sweep.plan_sweep(path)  # what `tell sweep --status --config` does: a committed folder must stay clean in git
    assert (tmp_path / "sw" / "sweep.sqlite").read_bytes() == before
    sweep.plan_sweep(path, {"sweep.max_cells": 1, "sweep.stop_after": "2h"})  # how long one sitting runs: not kept
    assert (tmp_path / "sw" / "sweep.sqlite").read_bytes() == before
    write_yaml(path, {"out": str(tmp_path / "sw"), "eval": {"limit": 10}, "grid": {**grid, "task_rows": [2, 3]}})
    sweep.plan_sweep(path)  # a changed plan is written
    assert sweep_eta.sweep_status(tmp_path / "sw")["cells"] == 4


def test_cells_with_general_rows_are_estimated_at_the_rate_such_cells_trained(tmp_path):
    """Long general rows (ShareGPT's, cut at 2k tokens) train slower than task rows: a left TELL cell is timed
    at the rate of the finished cells that had general rows, an SFT cell at the rate over all cells."""
    def done(arm, tokens, seconds, general_rows):
        metrics = {"n": 0, "trained_tokens": tokens, "task_tokens": 0, "general_tokens": 0,
                   "general_rows": general_rows}
        return {"result": json.dumps({"metrics": metrics, "timing": {"train_s": seconds}}),
                "config": json.dumps({"compare": {"arms": arm}})}
    rates = sweep_eta.measured_rates([done("sft", 44_000, 200, 0), done("tell", 30_000, 200, 20)])
    assert (rates["train_tok_s"], rates["train_tok_s_general"]) == (185.0, 150.0)
    # a training resumed from a checkpoint: its summary's wall time covers every sitting, the stage only the last
    resumed = {**done("tell", 30_000, 100, 20), "key": "abc"}
    (tmp_path / "cells" / "abc").mkdir(parents=True)
    (tmp_path / "cells" / "abc" / "train_summary.json").write_text(json.dumps({"wall_s": 300.0}))
    assert sweep_eta.measured_rates([resumed], tmp_path)["train_tok_s_general"] == 100.0
    path = write_yaml(tmp_path / "s.yaml", {"eval": {"limit": 1}, "grid": {"method": ["sft", "tell"]}})
    sft, tell = (cell.cfg for cell in sweep.expand_grid(*sweep.load_sweep(path)))
    slow, fast = {**rates, "train_tok_s_general": 50.0}, {**rates, "train_tok_s_general": 185.0}
    assert sweep_eta.estimate_cell_s(tell, slow) > sweep_eta.estimate_cell_s(tell, fast)
    assert sweep_eta.estimate_cell_s(sft, slow) == sweep_eta.estimate_cell_s(sft, fast)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


FAKE_RESULT = {"metrics": {"n": 1, "task_tokens": 0, "general_tokens": 0}, "timing": {}, "anchor": "",
               "task_rows": 0, "run_dir": "", "eval_dir": "", "row_ids": ["x"], "row_scores": [0.5]}


def test_resume_skips_done_reruns_cells_of_dead_processes_and_leaves_live_ones(tiny_model_dir, tmp_path):
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": f"Say {i}.", "response": f"w{i}"}) + "\n" for i in range(3)))
    out = tmp_path / "sw"
    path = write_yaml(tmp_path / "s.yaml", {
        "out": str(out), "model": {"name": str(tiny_model_dir)}, "data": {"general": str(FIXTURES / "general.jsonl")},
        "eval": {"task": "mine", "test": str(test), "metric": "exact", "limit": 0, "general_rows": 0},
        "generate": {"max_new_tokens": 2}, "grid": {"method": ["base"], "seed": [1, 2, 3, 4]}})
    sweep.plan_sweep(path)
    conn = sweep.open_store(sweep.db_path(out))
    done, dead, live, pending = [r["key"] for r in sweep.planned_cells(conn)]
    sweep.finish(conn, done, FAKE_RESULT, 1.0)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for key, pid in ((dead, _dead_pid()), (live, sleeper.pid)):
            conn.execute("UPDATE cells SET status = 'running', pid = ?, host = ? WHERE key = ?",
                         (pid, socket.gethostname(), key))
        status = sweep.run_sweep(path, write_report=False)
        rows = {r["key"]: r for r in sweep.planned_cells(conn)}
        assert json.loads(rows[done]["result"]) == FAKE_RESULT  # never run again
        assert rows[dead]["status"] == "done" and rows[pending]["status"] == "done"
        assert rows[dead]["attempts"] == 1 and rows[done]["attempts"] == 0
        assert rows[live]["status"] == "running" and rows[live]["pid"] == sleeper.pid
        assert (status["done"], status["running"], status["left"]) == (3, 1, 0)
        assert (out / "cells" / dead / "generations.jsonl").is_file()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sweep_eta.sweep_status(out)["left"] == 1  # its process is gone: the cell is left to run again
    conn.close()


def test_a_cell_another_host_left_running_is_named_and_released_on_request(tiny_model_dir, tmp_path, capsys):
    """A sweep folder copied from another machine (or a machine whose hostname changed) may hold a cell marked
    'running' there: it is left alone, but named with the way to take it over, which then runs it here."""
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": f"Say {i}.", "response": f"w{i}"}) + "\n" for i in range(2)))
    path = write_yaml(tmp_path / "s.yaml", {
        "out": str(tmp_path / "sw"), "model": {"name": str(tiny_model_dir)},
        "data": {"general": str(FIXTURES / "general.jsonl")},
        "eval": {"task": "mine", "test": str(test), "metric": "exact", "limit": 0, "general_rows": 0},
        "generate": {"max_new_tokens": 2}, "grid": {"method": ["base"], "seed": [1, 2]}})
    sweep.plan_sweep(path)
    conn = sweep.open_store(sweep.db_path(tmp_path / "sw"))
    elsewhere, here = [r["key"] for r in sweep.planned_cells(conn)]
    conn.execute("UPDATE cells SET status = 'running', pid = 4242, host = 'another-machine' WHERE key = ?",
                 (elsewhere,))
    assert cli.main(["sweep", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"{elsewhere} (base) on another-machine, pid 4242" in err and "--release-running" in err
    rows = {r["key"]: r for r in sweep.planned_cells(conn)}
    assert rows[elsewhere]["status"] == "running" and rows[here]["status"] == "done"
    assert cli.main(["sweep", "--config", str(path), "--release-running"]) == 0
    err = capsys.readouterr().err
    assert "1 cell(s) marked running were released" in err and "another-machine" not in err
    rows = {r["key"]: r for r in sweep.planned_cells(conn)}
    assert rows[elsewhere]["status"] == "done" and rows[elsewhere]["attempts"] == 1 and rows[here]["attempts"] == 1
    conn.close()


def test_two_cell_sweep_end_to_end_then_resumes_without_rerunning(tiny_model_dir, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Say the word number {i}.", "response": f"word{i}"}) + "\n"
                             for i in range(6)))
    test.write_text("".join(json.dumps({"prompt": f"Say the word number {i}.", "response": f"word{i}"}) + "\n"
                            for i in range(10, 14)))
    out = tmp_path / "sw"
    path = write_yaml(tmp_path / "s.yaml", {
        "model": {"name": str(tiny_model_dir)},
        "data": {"task": str(train), "general": str(FIXTURES / "general.jsonl")},
        "eval": {"task": "mine", "test": str(test), "metric": "exact", "limit": 0, "general_rows": 4},
        "train": {"batch_size": 2}, "generate": {"max_new_tokens": 3, "greedy": True},
        "sweep": {"resamples": 200},
        "grid": {"method": ["sft", "tell"], "task_rows": [4], "ratio": [2]}})
    assert cli.main(["sweep", "--config", str(path), "--out", str(out)]) == 0
    assert "done: 2" in capsys.readouterr().out
    conn = sweep.open_store(sweep.db_path(out))
    rows = sweep.planned_cells(conn)
    assert [r["status"] for r in rows] == ["done", "done"]
    results = {json.loads(r["config"])["compare"]["arms"]: json.loads(r["result"]) for r in rows}
    for result in results.values():
        assert len(result["row_scores"]) == 4 and all(0.0 <= s <= 1.0 for s in result["row_scores"])
        assert result["metrics"]["general_loss"] > 0 and result["metrics"]["general_loss_rows"] == 4
    assert results["tell"]["metrics"]["general_tokens"] > 0 and results["sft"]["metrics"]["general_tokens"] == 0
    for name in ("report.md", "report.html", "task_tokens.png"):
        assert (out / name).is_file(), name
    assert "Token-efficiency multiplier" in (out / "report.md").read_text()
    finished = [r["finished"] for r in rows]
    assert cli.main(["sweep", "--config", str(path), "--out", str(out)]) == 0  # nothing left: nothing runs
    assert [r["finished"] for r in sweep.planned_cells(conn)] == finished
    assert [r["attempts"] for r in sweep.planned_cells(conn)] == [1, 1]
    conn.close()
    assert cli.main(["sweep", "--status", "--out", str(out)]) == 0
    assert "done: 2" in capsys.readouterr().out
    (out / "report.md").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    # the same sweep on another metric of its cells, beside the main report; an unknown one is refused
    assert cli.main(["report", str(out), "--metric", "exact_match"]) == 0
    other = (out / "by-exact_match" / "report.md").read_text()
    assert "Score: `exact_match`" in other and "seeds only" in other
    capsys.readouterr()
    assert cli.main(["report", str(out), "--metric", "bleurt"]) == 2
    assert "exact_match" in capsys.readouterr().err


def test_report_verb_renders_a_compare_directory_and_refuses_others(tmp_path, capsys):
    arm = {"n": 5, "exact_match": 0.4, "ci95": {"exact_match": [0.1, 0.8]}, "optimizer_steps": 2,
           "task_tokens": 100, "general_tokens": 200, "trained_tokens": 300, "general_loss": 2.5, "general_ppl": 12.2}
    summary = {"task": "mine", "test_rows": 5, "task_rows": 4, "ratio": "2", "anchor": "A", "quick": False,
               "wall_s": 1.0, "stage_wall_s": {"base": {"eval_s": 0.5}, "tell": {"train_s": 1, "eval_s": 0.5}}}
    (tmp_path / "results.json").write_text(json.dumps({"base": arm, "tell": arm, "_summary": summary}))
    assert cli.main(["report", str(tmp_path)]) == 0
    assert "| tell |" in (tmp_path / "report.md").read_text()
    assert "<table>" in (tmp_path / "report.html").read_text() and (tmp_path / "compare.png").is_file()
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a sweep directory" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path), "--metric", "label_f1"]) == 2
    assert "applies to sweeps" in capsys.readouterr().err


def test_task_tokens_draws_the_fewest_rows_of_the_seeded_draw_reaching_the_budget(tiny_model_dir, tmp_path):
    from tell.compare import task_examples_for
    from tell.config import load_config
    from tell.experiment import task_from_config
    from tell.mix import encode_examples
    from tell.model import load_tokenizer
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"prompt": "Repeat: " + "word " * (i % 5 + 1), "response": "ok " * i}) + "\n"
                             for i in range(20)))
    test.write_text(json.dumps({"prompt": "Say hi.", "response": "hi"}) + "\n")
    overrides = {"model.name": str(tiny_model_dir), "data.task": str(train), "eval.task": "mine",
                 "eval.test": str(test), "eval.metric": "exact", "compare.task_tokens": 300}
    cfg = load_config(None, overrides)
    task = task_from_config(cfg)
    tokenizer = load_tokenizer(str(tiny_model_dir))

    def tokens(rows):
        return sum(len(e.input_ids) for e in encode_examples(tokenizer, rows))

    rows = task_examples_for(cfg, task)
    assert tokens(rows) >= 300 > tokens(task.train_examples(len(rows) - 1, cfg.mix.seed))
    assert rows == task.train_examples(len(rows), cfg.mix.seed)
    with pytest.raises(TellInputError, match="task_tokens"):
        task_examples_for(load_config(None, {**overrides, "compare.task_tokens": 10**6}), task)


def test_a_short_flag_sweep_does_not_take_points_to_its_dotted_form(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("grid:\n  - {method: [base]}\n")
    assert cli.main(["sweep", "--config", str(tmp_path / "s.yaml"), "--model", "x", "--status"]) == 2
    assert "--model.name VALUE" in capsys.readouterr().err
    assert cli.main(["sweep", "--config", str(tmp_path / "s.yaml"), "--greedy", "--status"]) == 2
    assert "--generate.greedy true" in capsys.readouterr().err
    assert cli.main(["sweep", "--config", str(tmp_path / "s.yaml"), "--seed", "3", "--status"]) == 2
    assert "--mix.seed VALUE --train.seed VALUE --generate.seed VALUE" in capsys.readouterr().err
