"""The ``teachers`` pipeline trains the teachers and nothing else, reproducibly; the default ships its teachers as
checkpoints that ``conf/teachers.yaml`` makes, verified by digest (issue 17)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from hpmkd.checkpoint import MODEL_FILE, file_digest
from hpmkd.components.tracking import child_runs
from hpmkd.config import load_config
from hpmkd.data import load_dataset
from hpmkd.pipelines.runner import run_experiment
from hpmkd.registry import ConfigError

ROOT = Path(__file__).resolve().parent.parent
#: the keys that fix the validation split: the shipped teachers never saw the default's
SPLIT_PLAN = ("name", "val_fraction", "meta_fraction", "split_seed")


def teachers_config(tmp_path: Path, store: str):
    """conf/teachers.yaml on digits: one small MLP teacher, 3 epochs, nothing reused."""
    return load_config(ROOT / "conf" / "teachers.yaml", [
        "data={name: digits, meta_fraction: 0.05, split_seed: 0}", "teachers=[{name: t, model: mlp, options: "
        "{hidden: 32, depth: 1}, train: {epochs: 3}}]", "train.batch_size=64", "reuse=false",
        f"output_dir={tmp_path / store}"])


def trained_teacher(tmp_path: Path, store: str) -> tuple[set[str], str, float]:
    """Run the teachers pipeline into a fresh store: its stage names, the sha256 of the teacher's selected weights
    (its MLflow artifact) and its validation accuracy."""
    uri = f"sqlite:///{tmp_path / store}.db"
    summary = run_experiment(teachers_config(tmp_path, store), tracking_uri=uri)
    client = MlflowClient(uri)
    runs = child_runs(client, client.get_run(summary["parent_run_id"]).info.experiment_id, summary["parent_run_id"])
    path = client.download_artifacts(runs["teacher_t"].info.run_id, f"checkpoint/{MODEL_FILE}", str(tmp_path))
    return set(runs), file_digest(path), runs["teacher_t"].data.metrics["val_acc"]


def test_the_teachers_pipeline_trains_only_the_teachers_and_reproduces_them_bit_for_bit(ray_session, tmp_path):
    stages, digest, val_acc = trained_teacher(tmp_path, "first")
    assert stages == {"teacher_t"}  # no student alone, no search, no distillation
    assert val_acc > 0.8  # digits: a 3-epoch MLP is a real teacher
    _, second, _ = trained_teacher(tmp_path, "second")
    assert second == digest  # training is deterministic on this CPU: the same file, byte for byte


def test_the_defaults_shipped_teachers_are_verified_by_their_digests():
    cfg = load_config(ROOT / "conf" / "default.yaml")
    assert [t.name for t in cfg.teachers] == ["cnn", "mlp"]
    for teacher in cfg.teachers:
        assert teacher.checkpoint and teacher.sha256 == file_digest(ROOT / teacher.checkpoint)
        assert not teacher.train  # loaded, never trained by the default


def test_the_default_refuses_a_teacher_file_that_is_not_the_shipped_one(tmp_path):
    wrong = tmp_path / "cnn.pt"
    wrong.write_bytes((ROOT / "conf" / "teachers" / "cnn.pt").read_bytes() + b"\0")
    with pytest.raises(ConfigError, match=r"^teachers\.0\.checkpoint: .* has sha256 "):
        load_config(ROOT / "conf" / "default.yaml", [f"teachers.0.checkpoint={wrong}"])


def test_the_teachers_recipe_matches_the_default_it_ships_for():
    """conf/teachers.yaml trains the default's teachers (same names, models, options) on the default's split plan with
    more training images: the default's student sees a nested subset of the teachers' training images, and the
    validation split is the same, so the teachers never trained on it; the student section is the default's."""
    default, recipe = (yaml.safe_load((ROOT / "conf" / name).read_text()) for name in ("default.yaml", "teachers.yaml"))
    assert {k: default["data"].get(k) for k in SPLIT_PLAN} == {k: recipe["data"].get(k) for k in SPLIT_PLAN}
    assert default["data"]["split_seed"] is not None  # the same splits for every seed of the default
    shipped = [(t["name"], t["model"], t.get("options", {})) for t in default["teachers"]]
    assert shipped == [(t["name"], t["model"], t.get("options", {})) for t in recipe["teachers"]]
    assert recipe["pipeline"] == "teachers" and recipe["student"] == default["student"]
    student, teachers = (load_dataset(c["data"]["name"], seed=c["data"]["split_seed"], max_train=c["data"]["max_train"],
                                      val_fraction=c["data"]["val_fraction"], meta_fraction=c["data"]["meta_fraction"])
                         for c in (default, recipe))
    assert default["data"]["max_train"] < recipe["data"]["max_train"]
    assert torch.equal(student.val.x, teachers.val.x) and torch.equal(student.test.y, teachers.test.y)
    seen = {row.numpy().tobytes() for part in (teachers.train, teachers.meta) for row in part.x}
    assert all(row.numpy().tobytes() in seen for part in (student.train, student.meta) for row in part.x)
    assert not seen & {row.numpy().tobytes() for row in student.val.x}
