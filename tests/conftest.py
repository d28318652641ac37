"""Shared fixtures: one real local Ray instance for the whole session (starting Ray costs ~5 s), and the test markers.

Every test is marked ``integration`` (it asks for the ``ray_session`` or ``tracking_uri`` fixture, or its module or
function says so) or ``unit`` (everything else). A unit test that starts Ray fails: the markers say what they are.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import pytest


def session_token() -> None:
    """Ray's token authentication stays on in the tests, as it is for every local ``ray.init`` since Ray 2.59: all
    a local cluster needs is ``RAY_AUTH_MODE=token`` and a token that every process of the session (the Ray
    processes it starts, and drivers started as subprocesses that join it by address) can read, from
    ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (in that order). A fresh random
    token in a private temporary file is used, unless the environment already names one; processes without it are
    refused (tests/test_reliability.py)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    folder = Path(tempfile.mkdtemp(prefix="hpmkd-ray-auth-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)


session_token()


#: fixtures that make a test an integration test
INTEGRATION_FIXTURES = {"ray_session", "tracking_uri"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("integration") is None:
            kind = "integration" if INTEGRATION_FIXTURES & set(item.fixturenames) else "unit"
            item.add_marker(getattr(pytest.mark, kind))


def ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.fixture(autouse=True)
def unit_tests_start_no_ray(request):
    """A unit test may not start Ray (mark it ``integration``, or give it the ``ray_session`` fixture)."""
    before = ray_running()
    yield
    if request.node.get_closest_marker("unit") is not None and not before and ray_running():
        pytest.fail("a unit test started Ray: mark it integration (or use the ray_session fixture)")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny tensors on a 2-core machine run far faster on one thread than two (no oversubscription with Ray)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """A 2-CPU local Ray shared by every test that needs Ray; shut down at the end of the session."""
    import ray

    from hpmkd.components.ray_runtime import ensure_ray

    ensure_ray(None, 2, None, log_to_driver=False, object_store_memory=256 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.fixture
def tracking_uri(tmp_path):
    """A fresh, real MLflow SQLite store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def train_digits_teacher(folder, hidden: int, depth: int, epochs: int) -> str:
    """An MLP teacher for scikit-learn's digits, trained in-process (no Ray), saved as a state in ``folder``; its path."""
    from hpmkd import checkpoint
    from hpmkd.config import DataConfig, TrainConfig
    from hpmkd.models.ref import ModelRef
    from hpmkd.training import StageEnv, StageSpec, train_stage

    states = []
    spec = StageSpec("teacher", 0, DataConfig(name="digits"), ModelRef("mlp", {"hidden": hidden, "depth": depth}),
                     TrainConfig(epochs=epochs, batch_size=64))
    train_stage(spec, StageEnv(report=lambda metrics, state: states.append(state)))
    path = folder / checkpoint.STATE_FILE
    checkpoint.save_atomic(states[-1], path)
    return str(path)


def kill_a_stage_worker() -> int | None:
    """SIGKILL the process of one running stage of this session's cluster (a Ray Train worker, or the worker running a
    stage's Ray task); its pid, or ``None`` when there is none."""
    import os
    import signal

    import ray
    from ray.util.state import list_actors, list_tasks

    from hpmkd.components.task_executor import TASK_NAME_PREFIX

    address = ray.get_runtime_context().gcs_address  # this session's cluster, even if others run on the machine
    pids = [actor.pid for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True)
            if actor.class_name == "RayTrainWorker" and actor.pid]
    # a stage task waiting on its tracking relay each epoch shows as RUNNING_IN_RAY_GET for that moment, and Ray's
    # state API can report that state a while after it has passed
    for state in ("RUNNING", "RUNNING_IN_RAY_GET", "RUNNING_IN_RAY_WAIT"):
        pids += [task.worker_pid for task in list_tasks(address=address, filters=[("state", "=", state)], detail=True)
                 if task.name.startswith(TASK_NAME_PREFIX) and task.worker_pid]
    if not pids:
        return None
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]
