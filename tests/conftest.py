"""Shared fixtures: one real local Ray instance for the whole session (starting Ray costs ~5 s)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny tensors on a 2-core machine run far faster on one thread than two (no oversubscription with Ray)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """A 2-CPU local Ray shared by every test that needs Ray; shut down at the end of the session."""
    import ray

    from components.ray_runtime import ensure_ray

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
    from hpmkd.config import DataConfig, ModelConfig, TrainConfig
    from hpmkd.training import StageEnv, StageSpec, train_stage

    states = []
    spec = StageSpec("teacher", 0, DataConfig(name="digits"), ModelConfig("mlp", {"hidden": hidden, "depth": depth}),
                     TrainConfig(epochs=epochs, batch_size=64))
    train_stage(spec, StageEnv(report=lambda metrics, state: states.append(state)))
    path = folder / checkpoint.STATE_FILE
    checkpoint.save_atomic(states[-1], path)
    return str(path)
