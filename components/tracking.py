"""MLflow recording: one parent run per experiment run, one nested run per stage (the shared optimisation memory).

The default store is a SQLite file plus an artifacts folder in the working folder (MLflow 3 no longer writes the
file store). Stage runs are created with :class:`mlflow.MlflowClient` and explicit run ids, so several stages can be
recorded at once from driver threads and per-epoch metrics can be logged from inside Ray Train workers. A stage
that raises is marked ``FAILED`` with its error as a tag and an ``error.txt`` artifact; finished stages stay.

Several drivers may share one store. A SQLite store is opened under an exclusive file lock (``<db>.lock``): the
first opening creates the tables (MLflow's migrations are not safe to run twice at once: two first runs crashed
with ``alembic`` errors) and switches the file to write-ahead logging (``PRAGMA journal_mode=WAL``: readers no
longer block the writer); the experiment is created under the same lock (and, on a server, re-read when another
client created it first). A store that cannot be opened is a :class:`~hpmkd.registry.ConfigError` naming the URI.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LifecycleStage, Metric, Param
from mlflow.exceptions import MlflowException

from hpmkd.config_schema import flatten
from hpmkd.registry import ConfigError

MAX_PARAM_LENGTH = 6000  # MLflow 3 limit for a param value
MAX_BATCH = 100
EXPORT_LOCK = threading.Lock()
_WARMING: list[threading.Thread] = []  # the warm-up thread of :func:`warm_model_export`, once started
_WARMING_LOCK = threading.Lock()  # not EXPORT_LOCK: a stage starting must not wait for another stage's export


def warm_model_export() -> None:
    """Ready this process's first MLflow model export on a background thread, once per process.

    A process's first ``mlflow.pytorch.log_model`` costs 1.5-2 s more than the next ones: ``torch.export`` sets itself
    up, and MLflow maps every installed package's modules to check the model's requirements. A stage that will
    export its student calls this before its training starts; the thread saves a one-layer model to a temporary
    folder meanwhile, on a core the driver otherwise leaves idle, under :data:`EXPORT_LOCK` (``torch.export`` is
    not thread-safe).
    """
    with _WARMING_LOCK:
        if _WARMING:
            return
        _WARMING.append(threading.Thread(target=_save_a_one_layer_model, name="hpmkd-warm-export", daemon=True))
    _WARMING[0].start()


def _save_a_one_layer_model() -> None:
    import tempfile

    import mlflow.pytorch
    import torch

    with EXPORT_LOCK, tempfile.TemporaryDirectory() as folder:
        # two rows, as the stages' exports: torch.export warns that it specialises a batch dimension of 1
        mlflow.pytorch.save_model(torch.nn.Linear(1, 1), Path(folder) / "model",
                                  input_example=torch.zeros(2, 1).numpy(), pip_requirements=torch_requirement())


def torch_requirement() -> list[str]:
    """The exported models' pip requirements: this torch release (given, so MLflow does not spend seconds inferring
    them)."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}"]


def default_tracking_uri(folder: str | os.PathLike = ".") -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else an absolute SQLite URI in ``folder`` (absolute: Ray workers change CWD)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def default_artifact_root(tracking_uri: str) -> str | None:
    """For a local SQLite store, keep artifacts beside the database (``mlartifacts/``); servers choose their own."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for other stores and in-memory SQLite)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """An exclusive lock on a SQLite store (``<db>.lock`` beside it) while it is created or its experiment made;
    nothing for other stores."""
    db = sqlite_file(tracking_uri)
    if db is None:
        yield
        return
    if not db.parent.is_dir():
        raise ConfigError(f"MLflow store {tracking_uri!r}: folder {str(db.parent)!r} does not exist; create it, or "
                          f"give --tracking-uri / mlflow.tracking_uri a SQLite file in an existing folder.")
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def use_wal(tracking_uri: str) -> None:
    """Switch a SQLite store to write-ahead logging (a setting kept in the file; a no-op when already on)."""
    db = sqlite_file(tracking_uri)
    if db is not None:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
            con.execute("PRAGMA journal_mode=WAL")


@contextlib.contextmanager
def store_errors(tracking_uri: str) -> Iterator[None]:
    """A store that cannot be opened (unknown scheme, unreachable server, unreadable file) as a :class:`ConfigError`
    naming the URI."""
    try:
        yield
    except (MlflowException, sqlite3.Error) as err:
        raise ConfigError(f"MLflow store {tracking_uri!r} cannot be opened: {' '.join(str(err).split())} Check "
                          f"--tracking-uri / mlflow.tracking_uri (default: $MLFLOW_TRACKING_URI or "
                          f"sqlite:///./mlflow.db).") from err


def open_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """The id of experiment ``name``, created (with ``artifact_root``) if the store has none."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root)
        except MlflowException as err:  # another client created it between the lookup and here
            if err.error_code != "RESOURCE_ALREADY_EXISTS" or client.get_experiment_by_name(name) is None:
                raise
            found = client.get_experiment_by_name(name)
    if found.lifecycle_stage == LifecycleStage.DELETED:
        raise ConfigError(f"experiment {name!r} was deleted in this MLflow store; restore it (mlflow experiments "
                          f"restore --experiment-id {found.experiment_id}) or choose another experiment name.")
    return found.experiment_id


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log a dict of metrics at ``step`` in batches (works from any process that can reach the store)."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), MAX_BATCH):
        client.log_batch(run_id, metrics=items[i : i + MAX_BATCH], synchronous=True)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()]
    for i in range(0, len(items), MAX_BATCH):
        client.log_batch(run_id, params=items[i : i + MAX_BATCH], synchronous=True)


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """The stage runs nested under ``parent_run_id``, by their ``stage`` tag."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags["stage"]: r for r in runs}


@dataclass
class Tracker:
    """The MLflow side of one experiment run."""

    tracking_uri: str
    experiment: str
    artifact_root: str | None = None

    def __post_init__(self) -> None:
        with store_lock(self.tracking_uri), store_errors(self.tracking_uri):
            mlflow.set_tracking_uri(self.tracking_uri)
            self.client = MlflowClient(self.tracking_uri)
            root = self.artifact_root or default_artifact_root(self.tracking_uri)
            self.experiment_id = open_experiment(self.client, self.experiment, root)
            use_wal(self.tracking_uri)

    @staticmethod
    def check_store(tracking_uri: str) -> None:
        """Open the store at ``tracking_uri`` once, under its lock (created if new, as MLflow does);
        :class:`ConfigError` when it cannot be."""
        with store_lock(tracking_uri), store_errors(tracking_uri):
            MlflowClient(tracking_uri).search_experiments(max_results=1)
            use_wal(tracking_uri)

    def start_run(self, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def fail(self, run_id: str, error: BaseException) -> None:
        """Mark ``run_id`` failed, with the error message as a tag and the traceback as ``error.txt``."""
        text = "".join(traceback.format_exception(error))
        self.client.set_tag(run_id, "error", str(error)[:5000])
        self.log_text(run_id, text, "error.txt")
        self.finish(run_id, "FAILED")

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> Iterator[str]:
        """A run that ends FINISHED, or FAILED if the body raises (the error gets a ``run_id`` attribute and is
        re-raised), or KILLED on Ctrl-C."""
        run_id = self.start_run(name, tags, parent_run_id)
        try:
            yield run_id
        except KeyboardInterrupt:
            self.finish(run_id, "KILLED")
            raise
        except BaseException as err:
            self.fail(run_id, err)
            err.run_id = run_id  # type: ignore[attr-defined]
            raise
        self.finish(run_id)

    def finished_stage(self, key: str) -> str | None:
        """The newest FINISHED stage run with content key ``key`` that computed its outputs (was not itself reused)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.stage_key = '{key}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        return next((r.info.run_id for r in runs if r.data.tags.get("reused") != "true"), None)

    def child_runs(self, parent_run_id: str) -> dict[str, Any]:
        """The stage runs nested under ``parent_run_id``, by stage name."""
        return child_runs(self.client, self.experiment_id, parent_run_id)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        log_params(self.client, run_id, params)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        log_metrics(self.client, run_id, metrics, step)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client.log_text(run_id, json.dumps(data, indent=2, default=str), artifact_file)

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def download(self, run_id: str, path: str, dst: str | os.PathLike) -> str:
        return self.client.download_artifacts(run_id, path, str(dst))

    def log_model(self, run_id: str, model: Any, input_example: Any) -> None:
        """Log ``model`` as an MLflow PyTorch model named ``model`` (torch.export format; loads as a GraphModule).

        ``pip_requirements`` is given so MLflow does not spend seconds inferring them. ``torch.export`` is not
        thread-safe, and stages finish in parallel driver threads, so exports run one at a time.
        """
        import mlflow.pytorch

        with EXPORT_LOCK, mlflow.start_run(run_id=run_id, nested=True):
            mlflow.pytorch.log_model(model, name="model", input_example=input_example,
                                     pip_requirements=torch_requirement())
