"""Run a graph of stages: every stage whose inputs are ready starts at once, as far as the cluster's CPUs allow.

A stage declares what it needs (``cpus``); the scheduler starts ready stages, in the order the pipeline listed
them, while their summed demand fits the cluster, and Ray places each stage's workers and actors (load balancing is
Ray's: stages land wherever resources are free). Each stage runs in a driver thread (a ``TorchTrainer.fit`` blocks
its caller). When a stage fails, stages that depend on it are not started; independent ones finish, then the first
error is returned with the results. Start, end and waiting time of every stage are recorded.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable

from hpmkd.components.graph import Stage, StageResult, check_graph


def run_graph(
    stages: list[Stage],
    run_stage: Callable[[Stage, dict[str, StageResult]], StageResult],
    capacity_cpus: float,
    parallel: bool = True,
) -> tuple[dict[str, StageResult], BaseException | None]:
    """Run ``stages`` (see module docstring); returns every result and the first failure (``None`` if none)."""
    check_graph(stages)
    results: dict[str, StageResult] = {}
    pending = list(stages)
    running: dict[Future, Stage] = {}
    ready_since: dict[str, float] = {}
    origin = time.perf_counter()
    first_error: BaseException | None = None

    def launch(pool: ThreadPoolExecutor, stage: Stage) -> None:
        inputs = {d: results[d] for d in stage.deps}
        started = time.perf_counter()

        def body() -> StageResult:
            result = run_stage(stage, inputs)
            result.started_s = started - origin
            result.wait_s = started - ready_since[stage.name]
            return result

        running[pool.submit(body)] = stage

    with ThreadPoolExecutor(max_workers=max(1, len(stages))) as pool:
        while pending or running:
            now = time.perf_counter()
            used = sum(s.cpus for s in running.values())
            for stage in list(pending):
                if any(d in results and results[d].status != "FINISHED" for d in stage.deps):
                    pending.remove(stage)
                    results[stage.name] = StageResult(stage.name, stage.kind, None, "SKIPPED", 0.0,
                                                      error="an input stage failed")
                    continue
                if not all(d in results for d in stage.deps):
                    continue
                ready_since.setdefault(stage.name, now)
                fits = used + stage.cpus <= capacity_cpus + 1e-9 or not running
                if fits and (parallel or not running):
                    pending.remove(stage)
                    launch(pool, stage)
                    used += stage.cpus
            if not running:
                continue
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                stage = running.pop(future)
                try:
                    result = future.result()
                except BaseException as err:  # recorded, dependents skipped, raised at the end
                    first_error = first_error or err
                    result = StageResult(stage.name, stage.kind, getattr(err, "run_id", None), "FAILED", 0.0,
                                         error=str(err))
                results[stage.name] = result
    return results, first_error
