"""What every worker process of a local Ray instance imports as it starts (Ray's ``worker_process_setup_hook``).

Ray starts one idle worker process per CPU as soon as a driver connects, and a stage task runs in one of them
(:mod:`hpmkd.components.task_executor`). Without this hook a process's first stage pays the imports of torch, MLflow,
hpmkd's stage code and scikit-learn's metrics itself, 4-8 s before and after its epochs (``worker_start``,
``setup``, ``test`` in docs/performance.md); with it the idle processes import them at once, while the driver checks
the teachers and fills the logit cache, and the first stage starts warm. A process Ray starts later imports them
before its first task or actor, which then needs them anyway (teacher actors, Train workers, trial actors).
``ray.preload_workers: false`` turns it off.
"""

from __future__ import annotations

import importlib

#: imported by :func:`preload`: a training stage's code (torch, MLflow, Ray) and its test metrics' library
PRELOADED = ("hpmkd.components.task_executor", "sklearn.metrics")

#: the hook as Ray takes it: a module path that each worker imports and calls
HOOK = f"{__name__}.preload"


def preload() -> None:
    """Import :data:`PRELOADED` in this process."""
    for name in PRELOADED:
        importlib.import_module(name)
