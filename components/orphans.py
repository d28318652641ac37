"""Runs left ``RUNNING`` by a driver that died (SIGKILL, power loss, a killed job) are marked ``KILLED``.

MLflow cannot know that the process recording a run is gone, so every experiment's parent run carries its
driver's identity (``driver.id`` = host, pid and the process start time, which tells a reused pid apart) and a
heartbeat tag refreshed every :data:`HEARTBEAT_S` seconds. Before a new experiment run starts, :func:`sweep`
looks at the experiment's ``RUNNING`` parent runs and declares a driver dead when

* it ran on this host and its process no longer exists (or the pid now belongs to a younger process), or
* it ran elsewhere and its heartbeat is older than :data:`STALE_AFTER_S` (ten missed beats).

The dead driver's parent run and every ``RUNNING`` run nested under it (stages, Tune trials) become ``KILLED``
with a ``killed_reason`` tag. The rerun then reuses the stages that finished and resumes the interrupted one from
its last checkpoint (see :mod:`hpmkd.components.stages`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from mlflow import MlflowClient

log = logging.getLogger("hpmkd")

HEARTBEAT_S = 60.0
STALE_AFTER_S = 10 * HEARTBEAT_S
DRIVER_TAG = "driver.id"
HEARTBEAT_TAG = "driver.heartbeat"


def process_start_ticks(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), ``None`` if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (not Linux): only existence can be checked
        return "" if pid_exists(pid) else None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may contain spaces


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_driver() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start_ticks(pid) or ''}"


def driver_alive(driver: str, heartbeat: float | None, now: float) -> bool:
    host, pid, ticks = driver.rsplit(":", 2)
    if host == socket.gethostname():
        current = process_start_ticks(int(pid))
        return current is not None and (not ticks or not current or current == ticks)
    return heartbeat is not None and now - heartbeat < STALE_AFTER_S


@contextlib.contextmanager
def heartbeat(client: MlflowClient, run_id: str) -> Iterator[None]:
    """Tag ``run_id`` with this driver's identity and refresh its heartbeat until the block ends."""
    client.set_tag(run_id, DRIVER_TAG, this_driver())
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a busy store must not kill the experiment; a missed beat is fine
                client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="hpmkd-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def sweep(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark the runs of dead drivers in ``experiment_id`` ``KILLED`` (see module docstring); returns their run ids."""
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=50000)
    parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in running}
    now = time.time()
    dead_roots = {}
    for run in running:
        driver = run.data.tags.get(DRIVER_TAG)
        if driver is None or parent_of[run.info.run_id]:
            continue
        beat = run.data.tags.get(HEARTBEAT_TAG)
        if not driver_alive(driver, float(beat) if beat else None, now):
            dead_roots[run.info.run_id] = driver

    def root(run_id: str) -> str:
        seen = set()
        while parent_of.get(run_id) and run_id not in seen:
            seen.add(run_id)
            run_id = parent_of[run_id]
        return run_id

    killed = []
    for run in running:
        top = root(run.info.run_id)
        if top in dead_roots:
            client.set_tag(run.info.run_id, "killed_reason",
                           f"its driver {dead_roots[top]} died without closing it (found by a later run)")
            client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
    if killed:
        log.warning("marked %d run(s) of dead driver(s) KILLED: %s", len(killed), ", ".join(sorted(set(dead_roots.values()))))
    return killed
