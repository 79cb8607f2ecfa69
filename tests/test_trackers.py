"""Trackers for real: `tell train --report-to tensorboard|mlflow|wandb` on the tiny model, read back with each
tracker's own reader (TensorBoard's EventAccumulator, MLflow's client on the run's SQLite store, W&B's
`wandb leet inspect` on the offline run files); every number of train_log.jsonl comes back under its key and
step, and every tracker run is closed. No test reaches the network (conftest: W&B offline, no telemetry)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tell import cli
from tell.train import read_log

FIXTURES = Path(__file__).parent / "fixtures"
KEYS = ("loss", "loss_task", "loss_general", "lr", "tokens")  # the keys; all numeric ones are checked
pytestmark = pytest.mark.filterwarnings("ignore:training takes only", "ignore:warmup")


def _train(model_dir, out: Path, tracker: str, *extra: str) -> Path:
    argv = ["train", "--task", str(FIXTURES / "alpaca.jsonl"), "--general", str(FIXTURES / "general.jsonl"),
            "--model", str(model_dir), "--ratio", "max", "--batch-size", "2", "--max-steps", "4",
            "--report-to", tracker, "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return out


def _expected(run: Path) -> dict[str, dict[int, float]]:
    """Return {key: {step: value}} of every numeric field of train_log.jsonl (None = not logged)."""
    series: dict[str, dict[int, float]] = {}
    for record in read_log(run / "train_log.jsonl"):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(key, {})[record["step"]] = value
    assert set(KEYS) <= set(series) and len(series["loss_task"]) < len(series["loss"])  # some steps lack task rows
    return series


def _assert_same(got: dict[str, dict[int, float]], run: Path, rel: float = 0.0) -> None:
    expected = _expected(run)
    assert set(got) == set(expected)
    for key, steps in expected.items():
        assert got[key].keys() == steps.keys(), key
        for step, value in steps.items():
            assert got[key][step] == pytest.approx(value, rel=rel), (key, step)


def test_tensorboard_events_read_back_with_tensorboards_reader(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = _train(tiny_model_dir, tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    got = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    _assert_same(got, run, rel=1e-6)  # TensorBoard stores scalars as float32
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_mlflow_run_in_the_run_directory_with_the_same_metrics(tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient
    run = _train(tiny_model_dir, tmp_path / "run", "mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.info.run_name == "run"
    assert info.data.params["train.report_to"] == "mlflow" and float(info.data.params["train.lr"]) == 1e-4
    got = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in info.data.metrics}
    _assert_same(got, run)
    assert not list(Path.cwd().glob("mlruns")) and not (Path.cwd() / "mlflow.db").exists()


def test_mlflow_tracking_uri_from_the_environment_wins(tiny_model_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    store = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "halu")
    run = _train(tiny_model_dir, tmp_path / "run", "mlflow")
    assert not (run / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("halu").experiment_id])
    assert [r.info.run_id for r in runs] == [json.loads((run / "trackers.json").read_text())["mlflow"]]
    assert runs[0].data.metrics["loss"] == read_log(run / "train_log.jsonl")[-1]["loss"]


def _wandb_records(run: Path) -> list[dict]:
    """Return the records of the run's .wandb transaction log, as W&B's own `wandb leet inspect --json` reads them."""
    (log,) = run.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_wandb_offline_run_files_hold_the_same_metrics(tiny_model_dir, tmp_path):
    run = _train(tiny_model_dir, tmp_path / "run", "wandb")
    records = _wandb_records(run)
    got: dict[str, dict[int, float]] = {}
    for record in records:
        if record["type"] == "history":
            item = record["history"]["item"]
            for key, value in item.items():
                if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    got.setdefault(key, {})[item["_step"]] = value
    _assert_same(got, run)
    exits = [r for r in records if r["type"] == "exit"]
    assert len(exits) == 1 and exits[0]["exit"].get("exit_code", 0) == 0  # finished, exit code 0
    config = next(r for r in records if r["type"] == "run")["run"]["config"]
    assert "train" in json.dumps(config)


def test_resumed_run_goes_on_in_the_same_mlflow_run(tiny_model_dir, tmp_path):
    """A killed run, resumed, logs into the MLflow run it started; the run ends FINISHED with every step."""
    from mlflow.tracking import MlflowClient
    from test_resume import _args, _kill_after_first_checkpoint
    broken = tmp_path / "broken"
    argv = _args(tiny_model_dir, broken) + ["--report-to", "mlflow"]
    _kill_after_first_checkpoint(argv, tmp_path / "broken.partial")
    assert cli.main(["train", "--resume", str(broken)]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{broken / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "tell"]
    (only,) = client.search_runs([experiment.experiment_id])
    assert only.info.status == "FINISHED"
    log = read_log(broken / "train_log.jsonl")
    history = {m.step: m.value for m in client.get_metric_history(only.info.run_id, "loss")}
    assert sorted(history) == [r["step"] for r in log]
    assert all(history[r["step"]] == r["loss"] for r in log)  # bit-identical resume: re-logged steps agree


def test_a_resumed_mlflow_run_has_each_step_once(tmp_path):
    """A killed run logged steps 1-5, its last checkpoint was step 3: the resumed run logs 4-6 again and MLflow,
    which cannot delete points, must not show steps 4 and 5 twice; params, name and the logged 1-3 stay."""
    from mlflow.tracking import MlflowClient
    from tell.trackers import MLflowTracker
    run_dir = tmp_path / "run.partial"
    run_dir.mkdir()
    killed = MLflowTracker(run_dir, {"train": {"lr": 1e-4}})
    for step in range(1, 6):
        killed.log({"loss": float(step), "lr": 0.1}, step)
    first_id = killed.run_id  # no close(): the process was killed
    resumed = MLflowTracker(run_dir, {"train": {"lr": 1e-4}}, first_step=4)
    for step in range(4, 7):
        resumed.log({"loss": 10.0 + step, "lr": 0.2}, step)
    resumed.close(completed=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "tell"]
    (only,) = client.search_runs([experiment.experiment_id])
    assert only.info.run_id == json.loads((run_dir / "trackers.json").read_text())["mlflow"] != first_id
    assert only.info.status == "FINISHED" and only.info.run_name == "run" and only.data.params["train.lr"] == "0.0001"
    for key, before, after in (("loss", [1.0, 2.0, 3.0], [14.0, 15.0, 16.0]), ("lr", [0.1] * 3, [0.2] * 3)):
        history = sorted((m.step, m.value) for m in client.get_metric_history(only.info.run_id, key))
        assert history == list(zip(range(1, 7), before + after)), key
    again = MLflowTracker(run_dir, {"train": {"lr": 1e-4}}, first_step=7)  # nothing logged past 6: same run
    assert again.run_id == only.info.run_id


def test_a_crash_marks_the_tracker_run_failed(tiny_model_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    import tell.train
    calls = {"n": 0}
    real = tell.train._train_step

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(tell.train, "_train_step", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated"):
        _train(tiny_model_dir, tmp_path / "run", "mlflow", "--save-every", "1")
    partial = tmp_path / "run.partial"  # kept: it holds a checkpoint to resume from
    client = MlflowClient(tracking_uri=f"sqlite:///{partial / 'mlflow.db'}")
    run = client.get_run(json.loads((partial / "trackers.json").read_text())["mlflow"])
    assert run.info.status == "FAILED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2]
