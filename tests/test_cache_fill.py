"""The Ray Data fill of the logit cache (``ray.cache_fill: ray_data``, :mod:`hpmkd.components.cache_fill`): the
entries it writes equal the actor fill's bit for bit, its shards are reused after an interruption and removed once
the entry is in, a pipeline filled by it trains and records its runs, and a bad option is refused.

Real digits rows, real MLP teachers, the session's local Ray."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from hpmkd.components.tracking import child_runs
from hpmkd.config import CACHE_FILLS, DataConfig, RayConfig
from hpmkd.data import load_dataset
from hpmkd.data.views import PLAIN, ViewBank
from hpmkd.logit_cache import CachedLogits, entry_path, list_entries, write_entry
from hpmkd.models.ref import ModelRef
from hpmkd.registry import ConfigError
from hpmkd.teachers import TeacherSpec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", **DataConfig(name="digits").loader_kwargs(0))


@pytest.fixture(scope="module")
def teachers(digits, tmp_path_factory):
    """Two MLP teachers of different widths, their weights saved as state dicts."""
    folder = tmp_path_factory.mktemp("teachers")
    specs, paths = [], []
    for seed, hidden in enumerate((32, 16)):
        spec = TeacherSpec(f"mlp{hidden}", ModelRef("mlp", {"hidden": hidden}), digits.shape)
        torch.manual_seed(seed)
        path = folder / f"{spec.name}.pt"
        torch.save(spec.model.build(spec.shape).state_dict(), path)
        specs.append(spec)
        paths.append(str(path))
    return specs, paths


def entry_arrays(path: str) -> dict[str, torch.Tensor]:
    """Every column of an entry as float32 / int64 tensors (logits or top-k values and indices, features)."""
    entry = CachedLogits(path)
    arrays = {"values": entry.values.astype(np.float32)}
    if entry.indices is not None:
        arrays["indices"] = entry.indices.astype(np.int64)
    arrays.update({f"feature:{tap}": v.astype(np.float32) for tap, v in entry.feature_values.items()})
    return {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in arrays.items()}


def test_ray_data_and_task_entries_equal_the_actor_fills(ray_session, tmp_path, digits, teachers):
    """Same teachers, same views (a 2-view bank), float16 with top-k and a feature tap: identical keys and
    identical stored values, whichever fill wrote them; every entry passes verification; no shard is left."""
    from hpmkd.components.cache_fill import ActorFill, RayDataFill, TaskFill
    from hpmkd.components.logit_cache import ensure_cached
    from hpmkd.components.teacher_service import start_teacher_actors

    specs, paths = teachers
    bank = ViewBank("flip", 3, 2)
    kwargs = dict(fingerprint=digits.fingerprint, views=bank, top_k=4, taps=[("hidden1",), ()])
    actor_fill = ActorFill(start_teacher_actors(specs, paths, cpus=0.5, gpus=0.0))
    data_fill = RayDataFill(specs, paths, cpus=0.5, gpus=0.0, replicas=2)
    task_fill = TaskFill(specs, paths, cpus=0.5, gpus=0.0, replicas=2)
    try:
        by_actors = ensure_cached(actor_fill, specs, paths, digits.train, root=str(tmp_path / "a"), **kwargs)
        by_ray_data = ensure_cached(data_fill, specs, paths, digits.train, root=str(tmp_path / "b"), **kwargs)
        by_tasks = ensure_cached(task_fill, specs, paths, digits.train, root=str(tmp_path / "c"), **kwargs)
    finally:
        actor_fill.release()
        data_fill.release()
        task_fill.release()
    assert len(digits.train) > 1024  # several chunks, so the assembly from shards is exercised
    pairs = [(a, b) for other in (by_ray_data, by_tasks) for per_view_a, per_view_b in zip(by_actors, other)
             for a, b in zip(per_view_a, per_view_b)]
    assert len(pairs) == 8
    for a, b in pairs:
        assert a.digest == b.digest and not a.hit and not b.hit
        arrays_a, arrays_b = entry_arrays(a.path), entry_arrays(b.path)
        assert arrays_a.keys() == arrays_b.keys()
        assert all(torch.equal(arrays_a[k], arrays_b[k]) for k in arrays_a), a.teacher
    for root in ("b", "c"):
        listed = list(list_entries(tmp_path / root))
        assert len(listed) == 4 and all(e.problem is None for e in listed)  # 2 teachers x 2 views, no shard left
        assert {e.key.split for e in listed} == {"train"}


def test_an_interrupted_fill_reuses_its_shards(ray_session, tmp_path, digits, teachers):
    """A shard already on the cache root (from a fill that stopped) is taken as it is, not recomputed; the
    entry is assembled from it and the shards are removed."""
    from hpmkd.components.cache_fill import RayDataFill, shard_key
    from hpmkd.components.logit_cache import ensure_cached, teacher_key

    specs, paths = teachers
    root = tmp_path / "cache"
    key = teacher_key(specs[0], paths[0], digits.fingerprint, "train", PLAIN.name(0), "float32", None)
    marker = np.full((1024, 10), 7.0, np.float32)  # not what the teacher computes: recognisable if reused
    write_entry(root, shard_key(key, 0, 1024), marker)
    fill = RayDataFill(specs[:1], paths[:1], cpus=1.0, gpus=0.0)
    [[use]] = ensure_cached(fill, specs[:1], paths[:1], digits.train, root=str(root),
                            fingerprint=digits.fingerprint, dtype="float32")
    assert use.path == str(entry_path(root, key))
    rows = CachedLogits(use.path).rows(torch.arange(len(digits.train)))
    assert torch.equal(rows[:1024], torch.from_numpy(marker))
    from hpmkd.teachers import load_teacher

    expected, _ = load_teacher(specs[0], paths[0]).forward(digits.train.rows(torch.arange(1024, len(digits.train)))[0])
    assert torch.equal(rows[1024:], expected.float())
    assert [e.key for e in list_entries(root)] == [key]


def test_auto_fills_with_tasks_on_one_node(ray_session, teachers):
    from hpmkd.components.cache_fill import TaskFill, start_fill

    specs, paths = teachers
    fill = start_fill(RayConfig(cache_fill="auto"), specs[:1], paths[:1])
    try:
        assert isinstance(fill, TaskFill) and fill.kind == "tasks" and len(fill.refs) == 1
    finally:
        fill.release()


def test_every_fill_name_is_registered():
    from hpmkd.components.cache_fill import FILLS

    assert FILLS.names() == sorted(CACHE_FILLS)
    assert RayConfig().cache_fill == "tasks"  # the default is the task fill
    with pytest.raises(ConfigError, match=r"ray\.cache_fill: 'raydata' is not a way to fill the logit cache"):
        RayConfig(cache_fill="raydata").check("ray")


def test_a_bad_cache_fill_is_refused_by_the_cli(tmp_path):
    path = tmp_path / "exp.yaml"
    data = yaml.safe_load((ROOT / "conf" / "smoke.yaml").read_text())
    data["ray"] = {**(data.get("ray") or {}), "cache_fill": "map_batches"}
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "hpmkd.cli", "validate", str(path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("hpmkd: error: ray.cache_fill: 'map_batches'") and "ray_data" in line, result.stderr


def test_a_run_filled_by_ray_data_trains_and_records_its_runs(ray_session, tmp_path):
    """The kd pipeline on digits with ``ray.cache_fill: ray_data``: the teacher trains, its outputs are cached by
    Ray Data, the student distils from the entry, and every stage lands as a finished MLflow run."""
    from hpmkd.config import config_from_data
    from hpmkd.pipelines.runner import run_experiment

    cfg = config_from_data({
        "experiment": "ray-data-fill", "pipeline": "kd", "output_dir": str(tmp_path / "runs"),
        "data": {"name": "digits", "max_train": 300, "max_val": 100, "max_test": 100},
        "teachers": [{"name": "t", "model": "mlp", "options": {"hidden": 32}}],
        "student": {"model": "mlp", "options": {"hidden": 8}},
        "train": {"epochs": 2, "batch_size": 64},
        "distill": {"ce_weight": 0.1, "methods": {"kd": {"weight": 0.9}}, "aggregator": {"name": "mean_logits"},
                    "temperature": {"schedule": "fixed", "T": 4.0}, "baseline": False, "teacher_outputs": "cache"},
        "ray": {"cache_fill": "ray_data"},
        "mlflow": {"log_models": False},
    })
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_experiment(cfg, tracking_uri=uri)
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    runs = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    assert runs and all(r.info.status == "FINISHED" for r in runs.values())
    distill = runs["distill"]
    assert distill.data.tags["teacher_outputs"] == "cache" and distill.data.params["cache_fill"] == "ray_data"
    assert distill.data.metrics["cache_entries"] == 1 and distill.data.metrics["cache_hits"] == 0
    assert len(client.get_metric_history(distill.info.run_id, "train_loss")) == 2
    [entry] = list(list_entries(cfg.cache_root()))
    assert entry.key.split == "train" and entry.problem is None


@pytest.mark.parametrize("kind", ["actors", "tasks"])
def test_a_fill_on_demand_starts_nothing_when_every_entry_is_cached(ray_session, tmp_path, digits, teachers, kind):
    """The first stage fills with an actor (or a task) per free CPU (2 chunks, 2 CPUs: 2 replicas), writing the
    entry one actor writes, bit for bit; the second finds it cached and starts nothing."""
    from hpmkd.components.cache_fill import ActorFill, FillOnDemand
    from hpmkd.components.logit_cache import ensure_cached
    from hpmkd.components.teacher_service import start_teacher_actors

    specs, paths = teachers[0][:1], teachers[1][:1]
    root = str(tmp_path / "cache")
    wait_until_cpus_free(ray_session, 2)
    first = FillOnDemand(RayConfig(cache_fill=kind), specs, paths)
    try:
        [use] = ensure_cached(first, specs, paths, digits.train, fingerprint=digits.fingerprint, root=root)[0]
        started = first.started
        replicas = len(started.pools[0].replicas) if kind == "actors" else started.replicas
        assert started.kind == kind and replicas == 2
    finally:
        first.release()
    assert first.started is None and not use.hit

    second = FillOnDemand(RayConfig(cache_fill=kind), specs, paths)
    [again] = ensure_cached(second, specs, paths, digits.train, fingerprint=digits.fingerprint, root=root)[0]
    assert second.started is None and second.kind == kind and again.hit and again.path == use.path

    one_actor = ActorFill(start_teacher_actors(specs, paths, cpus=0.5, gpus=0.0))
    try:
        [single] = ensure_cached(one_actor, specs, paths, digits.train, fingerprint=digits.fingerprint,
                                 root=str(tmp_path / "single"))[0]
    finally:
        one_actor.release()
    expected, found = entry_arrays(single.path), entry_arrays(use.path)
    assert expected.keys() == found.keys() and all(torch.equal(expected[k], found[k]) for k in expected)


def wait_until_cpus_free(ray, cpus: float) -> None:
    """Wait (up to a minute) until Ray has ``cpus`` CPUs free: actors an earlier test killed give theirs back a
    moment later."""
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0.0) < cpus and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_fill_gets_an_actor_per_free_cpu_up_to_its_chunks(ray_session):
    from hpmkd.components.cache_fill import fill_replicas

    wait_until_cpus_free(ray_session, 2)
    free = int(ray_session.available_resources().get("CPU", 0))
    assert free == 2  # the session's 2 CPUs, nothing else running
    assert fill_replicas(RayConfig(teacher_cpus=0.5), teachers=1, chunks=10) == free
    assert fill_replicas(RayConfig(teacher_cpus=0.5), teachers=2, chunks=10) == free // 2
    assert fill_replicas(RayConfig(teacher_cpus=2.0), teachers=1, chunks=10) == max(1, free // 2)
    assert fill_replicas(RayConfig(teacher_cpus=0.5), teachers=1, chunks=1) == 1  # one chunk: one actor
    assert fill_replicas(RayConfig(teacher_cpus=0.5, teacher_replicas=3), teachers=1, chunks=1) == 3  # never fewer
    assert fill_replicas(RayConfig(teacher_cpus=0.5, teacher_gpus=0.5), teachers=1, chunks=10) == 1  # no GPU free
