"""A Ray Train run whose checkpoint-manager snapshot a killed driver cut off mid-write resumes from its newest whole
checkpoint, instead of failing with ``CheckpointManagerInitializationError`` on every rerun."""

from __future__ import annotations

from pathlib import Path

import torch

from hpmkd import checkpoint
from hpmkd.components.stage_launch import StageLaunch
from hpmkd.components.stage_runner import run_training_stage
from hpmkd.components.train_snapshot import SNAPSHOT_FILE, recover_cut_snapshot
from hpmkd.config import DataConfig, RayConfig, TrainConfig
from hpmkd.models.ref import ModelRef
from hpmkd.training import StageSpec

SPEC = StageSpec("student", 0, DataConfig(name="digits"), ModelRef("mlp", {"hidden": 32, "depth": 1}),
                 TrainConfig(epochs=3, batch_size=64), read_test=False)


def fit(storage: Path, out: Path, spec: StageSpec = SPEC):
    launch = StageLaunch(spec, train_run_name="run", storage_path=str(storage), ray_cfg=RayConfig(executor="train"),
                         tracking_uri="", run_id=None)
    return run_training_stage(launch, out)


def test_a_cut_snapshot_resumes_from_the_newest_whole_checkpoint(ray_session, tmp_path):
    storage = tmp_path / "ray"
    first = fit(storage, tmp_path / "first", SPEC)
    assert first.metrics["resumed_at_epoch"] == 0
    run = storage / "run"
    whole = (run / SNAPSHOT_FILE).read_bytes()
    (run / SNAPSHOT_FILE).write_bytes(whole[: len(whole) // 2])  # what a write cut off halfway leaves
    [kept] = [p for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    copying = run / "checkpoint_9999-12-31_23-59-59.999999"  # newer by name: a folder Ray was still copying
    copying.mkdir()
    (copying / checkpoint.STATE_FILE).write_bytes((kept / checkpoint.STATE_FILE).read_bytes()[:100])

    longer = StageSpec(**{**SPEC.__dict__, "train": TrainConfig(epochs=5, batch_size=64)})
    resumed = fit(storage, tmp_path / "resumed", longer)

    assert resumed.metrics["resumed_at_epoch"] == 3  # from the whole checkpoint, not from scratch
    assert [p.name.startswith(f"{SNAPSHOT_FILE}.cut-") for p in run.iterdir() if "cut" in p.name] == [True]
    assert (run / SNAPSHOT_FILE).read_bytes() != whole[: len(whole) // 2]  # Ray wrote a new, whole one
    assert recover_cut_snapshot(str(storage), "run") is None
    history = checkpoint.load(resumed.state_path)["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    before = checkpoint.load(first.state_path)["history"]
    assert history[:3] == before  # the first three epochs are the first run's, not trained again


def test_a_whole_or_missing_snapshot_is_left_alone(tmp_path):
    assert recover_cut_snapshot(str(tmp_path), "absent") is None
    run = tmp_path / "run"
    run.mkdir()
    (run / SNAPSHOT_FILE).write_text('{"checkpoint_results": []}')
    assert recover_cut_snapshot(str(tmp_path), "run") is None
    assert [p.name for p in run.iterdir()] == [SNAPSHOT_FILE]


def test_a_cut_snapshot_without_a_loadable_checkpoint_starts_over(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    torch.save({"a": 1}, run / "checkpoint_2026-01-01_00-00-00.000000" / "other.pt")  # no state.pt
    (run / SNAPSHOT_FILE).write_bytes(b"")
    assert recover_cut_snapshot(str(tmp_path), "run") is None
    assert not (run / SNAPSHOT_FILE).exists() and len(list(run.glob(f"{SNAPSHOT_FILE}.cut-*"))) == 1
