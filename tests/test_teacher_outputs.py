"""Teacher outputs at speed and exact: the view bank, cached features, teacher replicas, and the ``auto`` rule.

Real Fashion-MNIST rows, real teacher networks, a real local Ray (session fixture) for the actors.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from mlflow import MlflowClient

from hpmkd.components.logit_cache import CachedTeachers, ensure_cached, teacher_key
from hpmkd.components.teacher_outputs import choose_source
from hpmkd.components.teacher_service import ActorTeachers, release, start_teacher_actors
from hpmkd.components.tracking import child_runs
from hpmkd.config import DataConfig, DistillConfig, TrainConfig, load_config
from hpmkd.data import load_dataset
from hpmkd.data.views import ViewBank
from hpmkd.logit_cache import CachedLogits, lookup
from hpmkd.registry import ConfigError
from hpmkd.teachers import LocalTeachers, TeacherSpec
from hpmkd.training import StageEnv, StageSpec, train_stage
from hpmkd.models.ref import DataShape, ModelRef

ROOT = Path(__file__).resolve().parent.parent
DATA = DataConfig(name="fashion_mnist", max_train=1500, max_val=200, max_test=200, augment="crop_flip")
BANK = ViewBank("crop_flip", seed=0, views=2)


@pytest.fixture(scope="module")
def images():
    return load_dataset(DATA.name, **DATA.loader_kwargs(0)).train  # 1500 rows: two fill chunks of 1024


@pytest.fixture
def teacher(tmp_path):
    """A cnn_small teacher with non-trivial BatchNorm statistics and confident outputs (its head scaled up, so
    different views give clearly different targets), saved as a state dict."""
    spec = TeacherSpec("t", ModelRef("cnn_small", {"stem_stride": 2}), DataShape(10, (1, 28, 28)))
    torch.manual_seed(0)
    net = spec.model.build(spec.shape)
    net.train()
    with torch.no_grad():
        net(torch.randn(64, 1, 28, 28) * 2 + 0.5)
        net.fc.weight.mul_(20)
    path = tmp_path / "teacher.pt"
    torch.save(net.eval().state_dict(), path)
    return spec, net, str(path)


def test_bank_entries_are_the_teachers_outputs_on_the_regenerated_views(ray_session, tmp_path, images, teacher):
    spec, net, weights = teacher
    root = str(tmp_path / "cache")
    pools = start_teacher_actors([spec], [weights], cpus=0.25, gpus=0.0, replicas=2)
    try:
        uses = ensure_cached(pools, [spec], [weights], images, root=root, fingerprint="fp", views=BANK, dtype="float32")
        served = ray.get([a.served.remote() for a in pools[0].replicas])
        grown = ensure_cached(pools, [spec], [weights], images, root=root, fingerprint="fp",
                              views=ViewBank("crop_flip", 0, 3), dtype="float32")
    finally:
        release(pools)
    assert [[u.hit for u in per_view] for per_view in uses] == [[False], [False]]
    assert served == [2, 2]  # 2 views x 2 chunks, spread over the two replicas
    assert [[u.hit for u in per_view] for per_view in grown] == [[True], [True], [False]]  # views shared across sizes

    source = CachedTeachers(["t"], [[u.path for u in per_view] for per_view in uses])
    index = torch.tensor([0, 1499, 1024, 77, 3, 1023])
    served_views = []
    for view in (0, 1):
        regenerated = BANK.render(images.x[index], index, view)
        cached = source.request(regenerated, index, [[]], view)().logits
        live = LocalTeachers(["t"], [net]).request(regenerated, index, [[]])().logits
        torch.testing.assert_close(cached, live, rtol=0, atol=1e-5)
        served_views.append(cached)
    assert not torch.allclose(served_views[0], served_views[1], atol=1e-3)  # the two views really differ

    key = CachedLogits(uses[0][0].path).key
    assert lookup(root, key) is not None
    assert lookup(root, replace(key, view=BANK.name(3))) is None  # a view never computed
    assert lookup(root, replace(key, view=ViewBank("crop_flip", 1, 2).name(0))) is None  # another bank seed
    assert lookup(root, replace(key, view="plain")) is None  # the unaugmented tensors
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in net.state_dict().items()}, weights)
    assert lookup(root, teacher_key(spec, weights, "fp", "train", BANK.name(0), "float32", None)) is None


def test_cached_features_equal_the_live_teachers_features(ray_session, tmp_path, images, teacher):
    spec, net, weights = teacher
    root = str(tmp_path / "cache")
    taps = [["pool", "stage2"]]
    pools = start_teacher_actors([spec], [weights], cpus=0.5, gpus=0.0)
    try:
        [[exact]] = ensure_cached(pools, [spec], [weights], images, root=root, fingerprint="fp", dtype="float32", taps=taps)
        [[half]] = ensure_cached(pools, [spec], [weights], images, root=root, fingerprint="fp", taps=taps)
    finally:
        release(pools)
    index = torch.tensor([1499, 0, 1024, 512, 9])
    live = LocalTeachers(["t"], [net]).request(images.x[index], index, taps)()
    cached = CachedTeachers(["t"], [[exact.path]]).request(images.x[index], index, taps)()
    halved = CachedTeachers(["t"], [[half.path]]).request(images.x[index], index, taps)()
    torch.testing.assert_close(cached.logits, live.logits, rtol=0, atol=1e-5)
    for tap in taps[0]:
        assert cached.features[0][tap].shape == live.features[0][tap].shape
        torch.testing.assert_close(cached.features[0][tap], live.features[0][tap], rtol=0, atol=1e-5)
        torch.testing.assert_close(halved.features[0][tap], live.features[0][tap], rtol=2e-3, atol=2e-3)
    assert set(cached.features[0]) == {"pool", "stage2"}
    key = CachedLogits(exact.path).key
    assert key.taps == ("pool", "stage2")
    assert lookup(root, replace(key, taps=())) is None  # a logits-only entry is another key
    with pytest.raises(KeyError, match="cache_features"):
        CachedTeachers(["t"], [[exact.path]]).request(images.x[index], index, [["stage1"]])


def test_replicas_serve_identical_logits_and_requests_are_spread(ray_session, tmp_path, images, teacher):
    spec, _, weights = teacher
    pools = start_teacher_actors([spec], [weights], cpus=0.25, gpus=0.0, replicas=2)
    try:
        replicas = pools[0].replicas
        x = images.x[:64]
        outs = ray.get([r.forward.remote(x.numpy(), []) for r in replicas])
        teachers = ActorTeachers(["t"], pools, start=1)  # a worker of rank 1 starts on replica 1
        for _ in range(3):
            served = teachers.request(x, torch.arange(64), [[]])()
        counts = ray.get([r.served.remote() for r in replicas])
    finally:
        release(pools)
    assert all(np.array_equal(o["logits"], outs[0]["logits"]) for o in outs)
    np.testing.assert_array_equal(served.logits[0].numpy(), outs[0]["logits"])
    assert counts == [1 + 1, 1 + 2]  # replicas 1, 0, 1 answered the three requests


def test_replaying_the_bank_trains_exactly_like_live_teachers_on_the_same_views(ray_session, tmp_path, teacher):
    """Two epochs of in-process distillation: bank entries (filled by actors) against the teacher run live on the
    same rendered views. Same losses, epoch by epoch: each epoch is served the logits of exactly its view (serving
    the views in the wrong order, the control, changes them)."""
    spec, net, weights = teacher
    splits = load_dataset(DATA.name, **DATA.loader_kwargs(0))
    pools = start_teacher_actors([spec], [weights], cpus=0.5, gpus=0.0)
    try:
        uses = ensure_cached(pools, [spec], [weights], splits.train, root=str(tmp_path / "cache"),
                             fingerprint=splits.fingerprint, views=BANK, dtype="float32")
    finally:
        release(pools)
    stage = StageSpec(name="distill", seed=0, data=DATA, model=ModelRef("cnn", {"width": 9, "stem_stride": 2}),
                      train=TrainConfig(epochs=2, batch_size=128), distill=DistillConfig(),
                      teacher_names=["t"], teacher_models=[spec.model], view_bank=BANK)
    paths = [[u.path for u in per_view] for per_view in uses]
    bank = train_stage(stage, StageEnv(teachers=CachedTeachers(["t"], paths)))
    live = train_stage(stage, StageEnv(teachers=LocalTeachers(["t"], [net])))
    swapped = train_stage(stage, StageEnv(teachers=CachedTeachers(["t"], paths[::-1])))
    curve = lambda run, key: [h[key] for h in run["history"]]  # noqa: E731
    for key in ("train_loss", "loss.kd.kd", "loss.ce", "val_loss"):
        np.testing.assert_allclose(curve(bank, key), curve(live, key), rtol=1e-5)
    assert all(abs(a / b - 1) > 1e-3 for a, b in zip(curve(swapped, "loss.kd.kd"), curve(live, "loss.kd.kd")))


def test_a_distill_stage_replays_the_bank_through_ray_train(ray_session, tmp_path, teacher):
    """The pipeline end to end: ``auto`` with random augmentation and ``bank_views`` picks the bank, fills one
    entry per view, records them, and the Train workers replay them."""
    _, _, weights = teacher
    cfg = load_config(ROOT / "conf" / "smoke.yaml", [
        f"teachers=[{{name: cnn, model: cnn_small, options: {{stem_stride: 2}}, checkpoint: {weights}}}]",
        "data.max_train=600", "data.max_val=200", "data.max_test=200", "data.augment=crop_flip",
        "train.epochs=3", "distill.bank_views=2", "distill.baseline=false", "mlflow.log_models=false",
        "ray.teacher_replicas=2", f"output_dir={tmp_path / 'runs'}",
    ])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from hpmkd.pipelines.runner import run_experiment

    summary = run_experiment(cfg, tracking_uri=uri)
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    run = child_runs(client, parent.info.experiment_id, parent.info.run_id)["distill"]
    assert run.info.status == "FINISHED" and run.data.tags["teacher_outputs"] == "bank"
    digests = run.data.params["cache.cnn"].split(",")
    assert len(digests) == 2 and len(set(digests)) == 2
    assert run.data.metrics["cache_entries"] == 2 and run.data.metrics["cache_hits"] == 0
    assert len(client.get_metric_history(run.info.run_id, "loss.kd.kd")) == 3
    entries = {CachedLogits(p).key.view for p in Path(cfg.cache_root()).glob("*.arrow")}
    assert entries == {"crop_flip:seed=0:view=0", "crop_flip:seed=0:view=1"}


@pytest.mark.parametrize("outputs,augment,bank_views,features,cache_features,chosen", [
    ("auto", "none", None, False, False, "cache"),
    ("auto", "crop_flip", None, False, False, "online"),
    ("auto", "crop_flip", 4, False, False, "bank"),
    ("auto", "none", None, True, False, "online"),
    ("auto", "none", None, True, True, "cache"),
    ("auto", "flip", 4, True, True, "bank"),
    ("auto", "flip", 4, True, False, "online"),
    ("online", "none", None, False, False, "online"),
    ("cache", "none", None, True, True, "cache"),
])
def test_auto_picks_the_fastest_exact_source(outputs, augment, bank_views, features, cache_features, chosen):
    distill = DistillConfig(teacher_outputs=outputs, bank_views=bank_views, cache_features=cache_features)
    assert choose_source(distill, augment, features) == chosen


def test_stored_sources_refuse_feature_methods_unless_features_are_cached():
    for outputs in ("cache", "bank"):
        with pytest.raises(ConfigError, match="cache_features: true"):
            choose_source(DistillConfig(teacher_outputs=outputs, bank_views=2), "flip", needs_features=True)


@pytest.mark.parametrize("overrides,message", [
    (["distill.teacher_outputs=bank", "data.augment=flip"], "distill.bank_views: teacher_outputs 'bank' needs"),
    (["distill.teacher_outputs=bank", "distill.bank_views=4"], "'bank' replays randomly augmented views"),
    (["distill.teacher_outputs=cache", "data.augment=crop_flip"], "teacher_outputs: bank with distill.bank_views"),
    (["distill.bank_views=0"], "distill.bank_views: must be > 0"),
    (["ray.teacher_replicas=0"], "ray.teacher_replicas: must be > 0"),
    (["ray.teacher_gpus=1.5"], "ray.teacher_gpus: GPUs per teacher actor must be a fraction"),
])
def test_bad_teacher_output_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "conf" / "smoke.yaml", overrides)
    load_config(ROOT / "conf" / "smoke.yaml", ["distill.teacher_outputs=bank", "data.augment=flip",
                                               "distill.bank_views=4", "ray.teacher_gpus=0.25", "ray.teacher_replicas=3"])
