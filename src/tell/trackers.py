"""Stage 5 (train), its experiment trackers: stream the step log to TensorBoard, MLflow or W&B.

In: the tracker name (``train.report_to``), the run directory and the resolved config. Out: a tracker whose
``log(metrics, step)`` sends the numeric fields of a ``train_log.jsonl`` record (loss, loss_task,
loss_general, lr, tokens, ...) under the same keys and whose ``close(completed)`` ends its run. Everything is
written inside the run directory: TensorBoard event files in ``tensorboard/``; an MLflow run in
``mlflow.db`` (SQLite, MLflow's default store: MLflow 3 refuses a file store unless told to), unless
``MLFLOW_TRACKING_URI`` names another store; W&B run files in ``wandb/`` (``WANDB_MODE=offline`` keeps them
local). A resumed run goes on in the same MLflow/W&B run: their ids are kept in ``trackers.json`` (MLflow's run is
copied without the steps the killed run logged after its last checkpoint, which are trained again).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from tell.data import TellInputError

# the modules each tracker imports (tensorboard's writer lives in torch but needs the tensorboard package)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "mlflow": ("mlflow",),
                   "wandb": ("wandb",)}
IDS_FILE = "trackers.json"


def check_tracker(report_to: str) -> None:
    """Raise before training when the chosen tracker library is not installed."""
    for module in TRACKER_MODULES.get(report_to, ()):
        try:
            __import__(module)
        except ImportError:
            raise TellInputError(f"--report-to {report_to} needs the '{report_to}' package: pip install "
                                 f"{report_to}", None, None, "train.report_to") from None


def open_tracker(report_to: str, run_dir: Path, run_config: dict, first_step: int = 1):
    """Return the tracker named by `report_to` writing into `run_dir` (None for 'none').

    `first_step` > 1 means a resumed run: the tracker continues the run it started before.
    """
    check_tracker(report_to)
    trackers = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}
    return trackers[report_to](Path(run_dir), run_config, first_step) if report_to in trackers else None


def _run_name(run_dir: Path) -> str:
    return run_dir.name.removesuffix(".partial")  # runs are written to <out>.partial, renamed when done


def _saved_id(run_dir: Path, tracker: str) -> str | None:
    path = run_dir / IDS_FILE
    return json.loads(path.read_text(encoding="utf-8")).get(tracker) if path.is_file() else None


def _save_id(run_dir: Path, tracker: str, run_id: str) -> None:
    path = run_dir / IDS_FILE
    ids = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    path.write_text(json.dumps({**ids, tracker: run_id}) + "\n", encoding="utf-8")


def _flat(config: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


class TensorBoardTracker:
    """Scalars in tensorboard/ (one tag per log key), read by TensorBoard's EventAccumulator."""

    def __init__(self, run_dir: Path, run_config: dict, first_step: int = 1):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step hides the steps a killed run logged after its last checkpoint (they are trained again).
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_step if first_step > 1 else None)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, completed: bool = True) -> None:
        self.writer.close()


class MLflowTracker:
    """One MLflow run (experiment $MLFLOW_EXPERIMENT_NAME or 'tell'): the config as params, the log as metrics."""

    def __init__(self, run_dir: Path, run_config: dict, first_step: int = 1):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}" if local else None
        # A new SQLite store logs its table creation at INFO level: not news to the user.
        store_log = logging.getLogger("mlflow.store.db.utils")
        level = store_log.level
        store_log.setLevel(logging.WARNING)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = _saved_id(run_dir, "mlflow") if first_step > 1 else None
            if self.run_id:
                self.run_id = _without_steps_from(self.client, self.run_id, first_step)
                _save_id(run_dir, "mlflow", self.run_id)
                self.client.update_run(self.run_id, status="RUNNING")
                return
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tell")
            experiment = self.client.get_experiment_by_name(name)
            artifacts = (run_dir / "mlflow-artifacts").resolve().as_uri() if local else None
            experiment_id = experiment.experiment_id if experiment else \
                self.client.create_experiment(name, artifact_location=artifacts)
            self.run_id = self.client.create_run(experiment_id, run_name=_run_name(run_dir)).info.run_id
        finally:
            store_log.setLevel(level)
        _save_id(run_dir, "mlflow", self.run_id)
        params = [Param(k, str(v)[:6000]) for k, v in _flat(run_config).items()]  # MLflow's value limit
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self, completed: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if completed else "FAILED")


def _without_steps_from(client, run_id: str, first_step: int) -> str:
    """Return the id of an MLflow run holding `run_id`'s params and metrics before `first_step`.

    A killed run logged the steps between its last checkpoint and the kill; the resumed run trains and logs
    them again. MLflow cannot delete logged points, so when there are such steps the run is copied without
    them (same name, params and tags) and the old one deleted; otherwise the same run goes on.
    """
    from mlflow.entities import Param, RunTag
    old = client.get_run(run_id)
    history = [m for key in old.data.metrics for m in client.get_metric_history(run_id, key)]
    if all(m.step < first_step for m in history):
        return run_id
    new_id = client.create_run(old.info.experiment_id, run_name=old.info.run_name).info.run_id
    params = [Param(k, v) for k, v in old.data.params.items()]
    tags = [RunTag(k, v) for k, v in old.data.tags.items() if not k.startswith("mlflow.")]
    kept = [m for m in history if m.step < first_step]
    for i in range(0, max(len(params), len(kept), 1), 100):  # MLflow's limits: 100 params, 1000 metrics a batch
        client.log_batch(new_id, params=params[i:i + 100], metrics=kept[i:i + 100], tags=tags if i == 0 else [])
    client.delete_run(run_id)
    return new_id


class WandbTracker:
    """One W&B run (project $WANDB_PROJECT or 'tell') with its files in wandb/; offline with WANDB_MODE=offline."""

    def __init__(self, run_dir: Path, run_config: dict, first_step: int = 1):
        import wandb
        resume_id = _saved_id(run_dir, "wandb") if first_step > 1 else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tell"), dir=str(run_dir), config=run_config,
                              name=_run_name(run_dir), id=resume_id, resume="allow" if resume_id else None)
        _save_id(run_dir, "wandb", self.run.id)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, completed: bool = True) -> None:
        self.run.finish(exit_code=0 if completed else 1)
