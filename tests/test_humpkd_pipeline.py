"""The ``humpkd`` pipeline: its graph, its part switches, its configs (the CPU one and the paper's GPU setting), and one
end-to-end run on a tiny PNG folder with real Ray and MLflow (the teachers' outputs and features cached from the
streamed folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from hpmkd.components.stage_params import LoadTeacher
from hpmkd.components.tracking import child_runs
from hpmkd.config import load_config
from hpmkd.data import load_dataset
from hpmkd.data.holdout import HoldOut
from hpmkd.distiller import Distiller
from hpmkd.logit_cache import CachedLogits
from hpmkd.models.ref import DataShape
from hpmkd.pipelines import plan_experiment
from hpmkd.pipelines.humpkd import FitMetaMLP
from hpmkd.pipelines.runner import run_experiment
from hpmkd.registry import ConfigError
from hpmkd.teachers import TeacherSpec, load_teacher

ROOT = Path(__file__).resolve().parent.parent
CPU, FIRE = ROOT / "conf" / "humpkd.yaml", ROOT / "conf" / "humpkd_fire.yaml"
TEACHERS = ROOT / "conf" / "humpkd_teachers.yaml"
#: conf/humpkd.yaml with its teachers trained in the run (conf/humpkd_teachers.yaml's models), as a user's own data needs
TRAINED_HERE = "teachers=" + json.dumps([{k: t[k] for k in ("name", "model", "options")}
                                          for t in yaml.safe_load(TEACHERS.read_text())["teachers"]])


def stages(path: Path = CPU, *overrides: str) -> dict:
    return {s.name: s for s in plan_experiment(load_config(path, list(overrides))).stages}


def test_the_graph_holds_out_rows_from_the_teachers_and_stacks_the_meta_mlp_on_them():
    graph = stages(CPU, TRAINED_HERE)
    assert list(graph) == ["teacher_swin", "teacher_vit", "student_alone", "meta_mlp", "plain_kd", "distill"]
    holdout = HoldOut(0.25, 0)
    assert graph["teacher_swin"].params.holdout == holdout == graph["teacher_vit"].params.holdout
    assert graph["student_alone"].params.holdout is None  # the student trains on every training row
    meta: FitMetaMLP = graph["meta_mlp"].params
    assert meta.members == ("teacher_swin", "teacher_vit") and meta.holdout == holdout
    assert [m["model"] for m in meta.model.options["members"]] == ["swin_tiny_patch4_window7_224",
                                                                    "vit_base_patch16_224"]
    assert graph["distill"].deps == ["teacher_swin", "teacher_vit", "meta_mlp"]
    distill = graph["distill"].params.recipe.distill
    assert distill.aggregator["name"] == "variance" and "hierarchical" in distill.methods and distill.schedule
    plain = graph["plain_kd"].params.recipe.distill
    assert plain.methods == {"kd": {"weight": 1.0}} and plain.aggregator == {"name": "mean_logits"}
    assert plain.schedule is None and graph["plain_kd"].params.teachers == ("teacher_swin", "teacher_vit")


@pytest.mark.parametrize("part", ["uncertainty", "hierarchical", "multistage", "meta"])
def test_each_part_switched_off_leaves_the_rest_and_the_teachers_alone(part):
    on, off = stages(CPU, TRAINED_HERE), stages(CPU, TRAINED_HERE, f"humpkd.{part}=false")
    assert off["teacher_swin"].params == on["teacher_swin"].params  # same teachers: reused by content key
    assert off["plain_kd"].params == on["plain_kd"].params
    full, ablated = on["distill"].params.recipe.distill, off["distill"].params.recipe.distill
    if part == "uncertainty":
        assert ablated.aggregator == {"name": "mean_probs"} and ablated.methods == full.methods
    elif part == "hierarchical":
        assert set(ablated.methods) == {"kd"}
        assert all(set(p.multipliers()) == {"kd"} for p in ablated.schedule.phases)
    elif part == "multistage":
        assert ablated.schedule is None and ablated.methods == full.methods
    else:
        assert "meta_mlp" not in off and off["distill"].params.teachers == ("teacher_swin", "teacher_vit")
        assert ablated == full


def test_the_shipped_teachers_never_trained_on_the_students_pool():
    """conf/humpkd.yaml loads the teachers conf/humpkd_teachers.yaml trains (same names, models and options), and those
    never saw a row of conf/humpkd.yaml's training split (data.reserve_train: its max_train): the Meta-MLP, fitted on
    a part of that split, is fitted on rows its base teachers never trained on; nor did they train on its validation
    split."""
    cfg, recipe = load_config(CPU), load_config(TEACHERS)
    graph = stages()
    assert all(isinstance(graph[f"teacher_{t}"].params, LoadTeacher) for t in ("swin", "vit"))
    assert [(t.name, t.ref) for t in cfg.teachers] == [(t.name, t.ref) for t in recipe.teachers]
    assert recipe.pipeline == "teachers" and recipe.student.ref == cfg.student.ref
    assert recipe.data.reserve_train == cfg.data.max_train and cfg.data.split_seed is not None
    student, teachers = (load_dataset(c.data.name, **c.data.loader_kwargs(c.seed)) for c in (cfg, recipe))
    seen = {row.numpy().tobytes() for row in teachers.train.x}
    assert len(teachers.train) == recipe.data.max_train
    assert not seen & {row.numpy().tobytes() for part in (student.train, student.val) for row in part.x}
    # the same validation split: the teachers were selected on a superset of the rows the students are selected on
    assert {row.numpy().tobytes() for row in student.val.x} <= {row.numpy().tobytes() for row in teachers.val.x}


def test_humpkd_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"humpkd\.hierarchical: the part is on but the recipe lacks it"):
        load_config(CPU, ["distill.methods={kd: {weight: 1.0}}", "distill.schedule=null"])
    with pytest.raises(ConfigError, match=r"humpkd\.uncertainty: the part is on"):
        load_config(CPU, ["distill.aggregator={name: mean_logits}"])
    with pytest.raises(ConfigError, match=r"humpkd\.holdout: the Meta-MLP is fitted on rows"):
        load_config(CPU, ["humpkd.holdout=0"])
    assert "meta_mlp" not in stages(CPU, "humpkd.holdout=0", "humpkd.meta=false")
    with pytest.raises(ConfigError, match=r"teachers: 'meta' is the name of the Meta-MLP teacher"):
        load_config(CPU, ["teachers.0.name=meta"])
    with pytest.raises(ConfigError, match=r"humpkd\.meta_mlp\.train\.lr: must be > 0"):
        load_config(CPU, ["humpkd.meta_mlp.train.lr=0"])


@pytest.mark.parametrize("path, shape", [(CPU, DataShape(10, (1, 28, 28))), (FIRE, DataShape(2, (3, 224, 224)))])
def test_both_configs_build_their_distillation_on_the_meta_device(path, shape, tmp_path):
    """Every model, feature tap and layer pair of the recipe resolves (the paper's full-size models included)."""
    folder = [f"data.root={tmp_path}"] if path == FIRE else []  # the paper's setting reads the user's folder
    cfg = load_config(path, folder)
    graph = stages(path, *folder)
    teachers = [t.ref for t in cfg.teachers]
    refs = teachers + ([graph["meta_mlp"].params.model] if "meta_mlp" in graph else [])
    with torch.device("meta"):
        student = cfg.student.ref.build(shape)
        distiller = Distiller(student, graph["distill"].params.recipe.distill, num_classes=shape.num_classes,
                              num_train=100, input_shape=shape.input_shape, student_taps=student.taps,
                              teacher_taps=[r.taps(shape) for r in refs])
    taps = distiller.teacher_tap_names()
    pairs = len(graph["distill"].params.recipe.distill.methods["hierarchical"]["pairs"])
    assert taps[-1] == [] and all(len(t) == pairs for t in taps[:2])  # the Meta-MLP has no spatial features
    if path == FIRE:
        assert 4.9e6 < cfg.student.ref.count_params(shape) < 5.7e6  # MobileViT-S (4.94 M with a 1000-class head)
        assert cfg.ray.use_gpu and cfg.data.name == "image_folder"


# --- end to end ------------------------------------------------------------------------------------------------

def write_images(root: Path, per_class: int = 14) -> None:
    rng = np.random.default_rng(0)
    for label, name in enumerate(("ember", "flame", "smoke")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            image[4:12, 4:12, label] = 255  # the class is a bright square in its own channel
            Image.fromarray(image).save(root / name / f"{i}.png")


TINY = [
    "teachers=[{name: swin, model: swin_tiny_patch4_window7_224, options: {patch_size: 2, window_size: 4, "
    "embed_dim: 8, depths: [1, 1], num_heads: [1, 2]}}, {name: vit, model: vit_base_patch16_224, "
    "options: {patch_size: 4, embed_dim: 8, depth: 2, num_heads: 2}}]",
    "student={model: mobilevit_xxs, options: {width_factor: 0.25}}",
    "train.epochs=2", "train.batch_size=16", "distill.baseline=false", "humpkd.plain_kd=false",
    "distill.methods={kd: {weight: 1.0}, hierarchical: {weight: 1.0, pairs: [[1, -2], [2, -1]]}}",
    "distill.teacher_outputs=cache", "humpkd.meta_mlp.train={epochs: 5, batch_size: 8}",
]


def test_humpkd_runs_end_to_end_on_an_image_folder(ray_session, tracking_uri, tmp_path):
    write_images(tmp_path / "images")
    cfg = load_config(CPU, [*TINY, "data={name: image_folder, root: " + str(tmp_path / "images") +
                            ", options: {workers: 1, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}",
                            f"output_dir={tmp_path / 'runs'}", "mlflow.log_models=false"])
    summary = run_experiment(cfg, tracking_uri=tracking_uri)
    assert [s["status"] for s in summary["stages"]] == ["FINISHED"] * 4
    client = MlflowClient(tracking_uri)
    runs = child_runs(client, client.get_experiment_by_name(cfg.experiment).experiment_id, summary["parent_run_id"])
    assert set(runs) == {"teacher_swin", "teacher_vit", "meta_mlp", "distill"}
    splits = load_dataset("image_folder", **cfg.data.loader_kwargs(cfg.seed))
    held = HoldOut(0.25, 0).held(splits.train)  # conf/humpkd.yaml's humpkd.holdout
    meta = runs["meta_mlp"].data
    assert meta.tags["holdout_verified"] == "true" and meta.metrics["holdout_rows"] == len(held)
    assert meta.params["holdout.fraction"] == "0.25" and "val_acc" in meta.metrics
    distill = runs["distill"].data
    assert distill.tags["teacher_outputs"] == "cache" and distill.metrics["cache_entries"] == 3
    for key in ("test_acc", "test_macro_f1", "test_noise_macro_f1", "test_motion_blur_acc", "test_cpu_fps",
                "test_size_mb"):
        assert np.isfinite(distill.metrics[key]), key
    assert distill.metrics["weight.hierarchical"] == 1.0  # the last epoch runs in the third phase
    history = client.get_metric_history(runs["distill"].info.run_id, "weight.hierarchical")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [0.0, 1.0]
    # the swin teacher's cached logits and features were computed from the decoded folder, row by row
    entries = {Path(p).stem: p for p in (Path(cfg.cache_root())).glob("*.arrow")}
    swin_entry = CachedLogits(entries[distill.params["cache.swin"]])
    assert swin_entry.rows_count == len(splits.train) and swin_entry.key.taps
    swin_file = next((tmp_path / "runs").glob("**/teacher_swin/model.pt"))
    teacher = load_teacher(TeacherSpec("swin", cfg.teachers[0].ref, splits.shape), str(swin_file))
    rows = torch.tensor([0, 7, len(splits.train) - 1])
    logits, feats = teacher.forward(splits.train.rows(rows)[0], list(swin_entry.key.taps))
    torch.testing.assert_close(swin_entry.rows(rows), logits.float(), atol=1e-2, rtol=1e-2)  # float16 entry
    for tap, value in swin_entry.features(rows, swin_entry.key.taps).items():
        torch.testing.assert_close(value, feats[tap].float(), atol=2e-2, rtol=2e-2)
    assert summary["student"]["stage"] == "distill"
