"""Run a graph of stages: every stage whose inputs are ready starts at once, as far as the cluster's CPUs allow.

A stage declares what it needs (``cpus``); the scheduler starts ready stages while their summed demand fits the
cluster, and Ray places each stage's workers and actors. Given each stage's expected duration
(:mod:`hpmkd.components.estimates`), ready stages start critical path first: by their *upward rank*, the
expected time from the stage's start to the end of the graph along its longest chain of dependents (the list
scheduling rule of HEFT, Topcuoglu et al. 2002); without estimates, in the order the pipeline listed them. Each stage
runs in a driver thread (a ``TorchTrainer.fit`` blocks its caller). When a stage fails, stages that depend on it are
not started; independent ones finish, then the first error is returned with the results. Start, end, waiting time
and estimate of every stage are recorded.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable

from hpmkd.components.graph import Stage, StageResult, check_graph


def upward_rank(stages: list[Stage], estimates: dict[str, float]) -> dict[str, float]:
    """Per stage, its estimate plus the largest upward rank among the stages that read it (module docstring)."""
    rank: dict[str, float] = {}
    for stage in reversed(stages):  # inputs are listed before the stages that read them
        after = [rank[s.name] for s in stages if stage.name in s.deps]
        rank[stage.name] = estimates.get(stage.name, 0.0) + max(after, default=0.0)
    return rank


def critical_path(stages: list[Stage], estimates: dict[str, float]) -> list[str]:
    """The chain of stages with the largest expected total duration, first to last."""
    rank = upward_rank(stages, estimates)
    path: list[str] = []
    candidates = [s for s in stages if not s.deps]
    while candidates:
        head = max(candidates, key=lambda s: rank[s.name])
        path.append(head.name)
        candidates = [s for s in stages if head.name in s.deps]
    return path


def run_graph(
    stages: list[Stage],
    run_stage: Callable[[Stage, dict[str, StageResult]], StageResult],
    capacity_cpus: float,
    parallel: bool = True,
    estimates: dict[str, float] | None = None,
) -> tuple[dict[str, StageResult], BaseException | None]:
    """Run ``stages`` (see module docstring); returns every result and the first failure (``None`` if none).
    ``estimates``: expected seconds per stage; given, ready stages start critical path first."""
    check_graph(stages)
    results: dict[str, StageResult] = {}
    pending = list(stages)
    if estimates is not None:
        rank = upward_rank(stages, estimates)
        pending.sort(key=lambda s: -rank[s.name])  # stable: equal ranks keep the pipeline's order
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
            result.estimate_s = None if estimates is None else estimates.get(stage.name)
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
