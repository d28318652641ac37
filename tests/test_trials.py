"""What a search trial trains (hpmkd.search_trials, ``StageSpec.train_fraction``) and where the meta temperature's outer
objective comes from (the meta split, never validation). Real training on scikit-learn's digits, in this process."""

from __future__ import annotations

import math

import pytest
import torch

from hpmkd.callbacks import held_out_batches
from hpmkd.config import DataConfig, DistillConfig, Recipe, TrainConfig
from hpmkd.data import load_dataset
from hpmkd.data.splits import trial_rows
from hpmkd.models.ref import ModelRef
from hpmkd.registry import ConfigError
from hpmkd.teachers import LocalTeachers
from hpmkd.training import StageEnv, StageSpec, train_stage
from hpmkd.search_trials import trial_spec

DIGITS = DataConfig(name="digits")
STUDENT = ModelRef("mlp", {"hidden": 16, "depth": 1})
TEACHER = ModelRef("mlp", {"hidden": 32, "depth": 1})
META_T = {"schedule": "meta", "T": 4.0, "T_min": 2.0, "T_max": 6.0}


class RecordingTeachers(LocalTeachers):
    """Local teachers that remember every row index they were asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list[int] = []

    def request(self, x, index, taps, view=0):
        self.asked += index.tolist()
        return super().request(x, index, taps, view)


def distil_spec(data: DataConfig = DIGITS, temperature: dict | None = None, epochs: int = 3) -> StageSpec:
    distill = DistillConfig(temperature=temperature or {"schedule": "fixed", "T": 4.0}, meta_interval=2)
    return StageSpec("distill", 0, data, STUDENT, TrainConfig(epochs=epochs, batch_size=64), distill,
                     teacher_names=["t"], teacher_models=[TEACHER])


def teachers(data: DataConfig = DIGITS) -> RecordingTeachers:
    torch.manual_seed(0)
    return RecordingTeachers(["t"], [TEACHER.build(load_dataset(data.name, **data.loader_kwargs(0)).shape)])


def test_a_trial_keeps_the_whole_schedule_on_a_stratified_share_served_by_the_parent_indices():
    spec = distil_spec(epochs=3)
    recipe = Recipe(spec.distill, spec.train)
    trial = trial_spec(spec, recipe, {"distill.temperature.T": 2.5, "distill.train.lr": 0.02}, 3, 0.25)
    assert trial.train.epochs == 3 and trial.train.lr == 0.02 and trial.distill.temperature["T"] == 2.5
    assert trial.train_fraction == 0.25 and not trial.read_test
    source = teachers()
    result = train_stage(trial, StageEnv(teachers=source))
    splits = load_dataset("digits", **DIGITS.loader_kwargs(0))
    rows = trial_rows(splits.train.y.numpy(), 0.25, seed=0)
    per_epoch = len(rows)
    assert len(rows) == round(0.25 * len(splits.train))
    # the first batch (setup) reads rows 0..63 of the split; then 3 epochs over exactly the share, by parent index
    asked = source.asked[min(64, len(splits.train)):]
    assert len(asked) == 3 * per_epoch and sorted(set(asked)) == rows.tolist()
    assert "test_acc" not in result and len(result["history"]) == 3
    whole = train_stage(trial_spec(spec, recipe, {}, 3, 1.0), StageEnv(teachers=teachers()))
    assert whole["history"][0]["train_loss"] != result["history"][0]["train_loss"]


def test_a_compressed_trial_is_the_recipe_at_fewer_epochs():
    spec = distil_spec(epochs=20)
    trial = trial_spec(spec, Recipe(spec.distill, spec.train), {}, 2, 1.0)
    assert trial.train.epochs == 2 and trial.train_fraction == 1.0
    steps = []
    train_stage(trial, StageEnv(teachers=teachers(), report=lambda m, s: steps.append(s["step"])))
    assert steps[-1] == 2 * math.ceil(len(load_dataset("digits", **DIGITS.loader_kwargs(0)).train) / 64)


def test_the_meta_temperature_steps_on_the_meta_split_and_refuses_to_run_without_one():
    held = DataConfig(name="digits", meta_fraction=0.1)
    splits = load_dataset("digits", **held.loader_kwargs(0))
    x, y = next(held_out_batches(splits, 64, seed=0))
    meta_rows = {tuple(r) for r in splits.meta.x.flatten(1).tolist()}
    val_rows = {tuple(r) for r in splits.val.x.flatten(1).tolist()}
    assert all(tuple(r) in meta_rows and tuple(r) not in val_rows for r in x.flatten(1).tolist())
    history = train_stage(distil_spec(held, META_T), StageEnv(teachers=teachers(held)))["history"]
    assert history[-1]["temperature"] != 4.0  # T moved, learned from the meta split
    with pytest.raises(ConfigError, match="data.meta_fraction"):
        train_stage(distil_spec(DIGITS, META_T), StageEnv(teachers=teachers()))
