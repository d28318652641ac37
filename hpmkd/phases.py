"""Where a stage's time goes: named phases, each a wall-clock duration in seconds.

A stage's phases are recorded on its MLflow run as metrics ``stage_phase.<name>_s`` and in the results JSON (each
stage's ``phases``). The training loop measures its own (``setup``: data, model, objective and resume; ``epochs``:
the epochs' training and validation; ``report``: the per-epoch checkpoint and metric records; ``test``: the final
test read); the stage runner adds what surrounds it (``worker_start``: from ``fit()`` to the worker running,
``fit_end``: from the worker returning to ``fit()`` returning, ``copy_out``, ``record_files``, ``export_model``,
``teacher_outputs``), and the stage protocol the rest (``claim``, ``total``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

METRIC_PREFIX = "stage_phase."


class Phases:
    """Accumulated durations by phase name, in the order phases were first seen."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, seconds)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` block to phase ``name`` (also when the block raises)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - began)

    def update(self, seconds: dict[str, float]) -> None:
        for name, value in seconds.items():
            self.add(name, value)

    def metrics(self) -> dict[str, float]:
        """The phases as MLflow metrics: ``stage_phase.<name>_s``."""
        return {f"{METRIC_PREFIX}{name}_s": value for name, value in self.seconds.items()}
