"""Live progress of every running stage, fed by the training processes' own epoch reports (never by reading logs).

A :class:`ProgressHub` Ray actor (no CPU) receives one :class:`EpochReport` per epoch from each stage's rank-0
worker and each Tune trial (a fire-and-forget call, off the training's critical path); the driver's
:class:`ProgressMonitor` drains it every :data:`POLL_S` seconds and hands the reports to a display:

* :class:`LiveDisplay` (a terminal, not ``--quiet``): one ``rich`` progress row per running stage or trial: epoch
  k/N, the running (mean) training loss, the last validation accuracy and an ETA (the mean epoch time so far times
  the epochs left), several stages at once;
* :class:`LineDisplay` (``--quiet``, or output that is not a terminal): one log line per epoch.

The monitor is also told when the scheduler starts and ends a stage, so a stage shows from its start (before its
first epoch: data, workers) to its end.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import ray

log = logging.getLogger("hpmkd")

#: seconds between two looks at the hub
POLL_S = 0.5


@dataclass
class EpochReport:
    """One finished epoch of one stage (or trial): what a progress row shows."""

    stage: str
    epoch: int  # 0-based
    epochs: int
    train_loss: float
    val_acc: float
    epoch_time_s: float
    at: float = field(default_factory=time.time)

    @classmethod
    def of(cls, stage: str, epochs: int, metrics: dict[str, float]) -> "EpochReport":
        """From the metrics the training loop reports at an epoch's end."""
        return cls(stage, int(metrics["epoch"]), epochs, float(metrics.get("train_loss", float("nan"))),
                   float(metrics.get("val_acc", float("nan"))), float(metrics.get("epoch_time_s", 0.0)))


@ray.remote(num_cpus=0)
class ProgressHub:
    """Holds epoch reports until the driver collects them."""

    def __init__(self) -> None:
        self.reports: list[EpochReport] = []

    def report(self, report: EpochReport) -> None:
        self.reports.append(report)

    def drain(self) -> list[EpochReport]:
        out, self.reports = self.reports, []
        return out


def send(hub: Any, stage: str, epochs: int, metrics: dict[str, float]) -> None:
    """Report an epoch to ``hub`` (if any) without waiting for it."""
    if hub is not None:
        hub.report.remote(EpochReport.of(stage, epochs, metrics))


@dataclass
class StageProgress:
    """What the driver knows of one running stage."""

    name: str
    started: float = field(default_factory=time.time)
    epochs: int | None = None
    done: int = 0
    train_loss: float = float("nan")
    val_acc: float = float("nan")
    epoch_seconds: list[float] = field(default_factory=list)

    def apply(self, report: EpochReport) -> None:
        self.epochs = report.epochs
        self.done = max(self.done, report.epoch + 1)
        self.train_loss, self.val_acc = report.train_loss, report.val_acc
        self.epoch_seconds.append(report.epoch_time_s)

    def eta_s(self) -> float | None:
        """Seconds left: the mean epoch time so far times the epochs left (``None`` before the first epoch)."""
        if not self.epoch_seconds or self.epochs is None:
            return None
        return sum(self.epoch_seconds) / len(self.epoch_seconds) * max(0, self.epochs - self.done)

    def line(self) -> str:
        eta = self.eta_s()
        return (f"stage {self.name}: epoch {self.done}/{self.epochs} loss {self.train_loss:.4f} "
                f"val_acc {self.val_acc:.4f} eta {format_seconds(eta) if eta is not None else '-'}")


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


class Display(Protocol):
    def started(self, stage: StageProgress) -> None: ...
    def epoch(self, stage: StageProgress) -> None: ...
    def finished(self, stage: StageProgress, status: str) -> None: ...
    def close(self) -> None: ...


class LineDisplay:
    """One log line per epoch (``--quiet``, or not a terminal)."""

    def started(self, stage: StageProgress) -> None:
        pass

    def epoch(self, stage: StageProgress) -> None:
        log.info("%s", stage.line())

    def finished(self, stage: StageProgress, status: str) -> None:
        pass

    def close(self) -> None:
        pass


class LiveDisplay:
    """A ``rich`` progress table, one row per running stage; log records print above it."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description:<20}"), BarColumn(bar_width=24),
            TextColumn("epoch {task.completed:>3.0f}/{task.fields[epochs]}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("val_acc {task.fields[val_acc]}"),
            TextColumn("eta {task.fields[eta]}"), TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
            transient=False, refresh_per_second=2)
        self.tasks: dict[str, Any] = {}
        self.progress.start()

    @property
    def console(self) -> Any:
        return self.progress.console

    def started(self, stage: StageProgress) -> None:
        self.tasks[stage.name] = self.progress.add_task(stage.name, total=None, epochs="?", loss="-", val_acc="-",
                                                         eta="-", status="running")

    def epoch(self, stage: StageProgress) -> None:
        if stage.name not in self.tasks:  # a Tune trial: shown from its first epoch
            self.started(stage)
        eta = stage.eta_s()
        self.progress.update(self.tasks[stage.name], total=stage.epochs, completed=stage.done, epochs=stage.epochs,
                             loss=f"{stage.train_loss:.4f}", val_acc=f"{stage.val_acc:.4f}",
                             eta=format_seconds(eta) if eta is not None else "-")

    def finished(self, stage: StageProgress, status: str) -> None:
        task = self.tasks.get(stage.name)
        if task is not None:
            total = self.progress.tasks[task].total
            self.progress.update(task, total=total or 1, completed=total or 1, eta="-", status=status.lower())

    def close(self) -> None:
        self.progress.stop()


class ConsoleHandler(logging.Handler):
    """Log records printed through the live display's console, above the progress rows."""

    def __init__(self, console: Any, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)


class ProgressMonitor:
    """Drains a :class:`ProgressHub` in a driver thread and keeps ``display`` up to date (module docstring)."""

    def __init__(self, display: Display) -> None:
        self.display = display
        self.hub = ProgressHub.remote()
        self.stages: dict[str, StageProgress] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, name="hpmkd-progress", daemon=True)
        self.thread.start()

    def started(self, name: str) -> None:
        with self.lock:
            self.stages[name] = StageProgress(name)
            self.display.started(self.stages[name])

    def finished(self, name: str, status: str) -> None:
        """Stage ``name`` ended with ``status``; so did its Tune trials (rows ``<name>/<trial>``)."""
        self.collect()  # the stage's last epochs first
        with self.lock:
            for row in [n for n in self.stages if n == name or n.startswith(f"{name}/")]:
                self.display.finished(self.stages.pop(row), status)

    def collect(self) -> None:
        reports = ray.get(self.hub.drain.remote())
        with self.lock:
            for report in reports:
                stage = self.stages.setdefault(report.stage, StageProgress(report.stage))
                stage.apply(report)
                self.display.epoch(stage)

    def poll(self) -> None:
        while not self.stop.wait(POLL_S):
            try:
                self.collect()
            except Exception as err:  # progress is a view: never let it end the run
                log.debug("progress: %s", err)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        try:
            self.collect()
        except Exception as err:
            log.debug("progress: %s", err)
        self.display.close()
        ray.kill(self.hub)


@contextlib.contextmanager
def console_logging(display: Display) -> Iterator[None]:
    """While ``display`` is live, log records print through its console (above the progress rows), not over it."""
    console = getattr(display, "console", None)
    root = logging.getLogger()
    if console is None:
        yield
        return
    saved = root.handlers
    formatter = saved[0].formatter if saved else None
    root.handlers = [ConsoleHandler(console, formatter)]
    try:
        yield
    finally:
        root.handlers = saved
        display.close()
