"""Estimator teachers: options checked against the estimator, safe files, served log-probabilities, out-of-fold
outputs (each row from the fold that excluded it) and their way through the teacher-output cache."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from sklearn.base import clone

from hpmkd.data import load_dataset
from hpmkd.estimator_teacher import EstimatorTeacher
from hpmkd.estimators import (PROB_FLOOR, check_options, estimator_size, file_name, load_estimator,
                              predict_log_proba, save_estimator)
from hpmkd.models.ref import ModelRef
from hpmkd.oof import FoldOutputs, fit_teacher
from hpmkd.registry import ConfigError
from hpmkd.teachers import LocalTeachers, TeacherSpec, load_teacher, provider_for

RF = ("RandomForestClassifier", {"n_estimators": 20})


@pytest.fixture(scope="module")
def wine():
    return load_dataset("wine", seed=0)


@pytest.fixture(scope="module")
def fitted_rf(wine):
    return fit_teacher(*RF, wine.train.x.numpy(), wine.train.y.numpy(), fit="oof", folds=4, seed=0,
                       class_names=wine.class_names)


def test_out_of_fold_outputs_come_from_the_fold_that_excluded_each_row(wine, fitted_rf):
    x, y = wine.train.x.numpy(), wine.train.y.numpy()
    outputs = fitted_rf.train_outputs
    assert sorted(np.unique(outputs.fold).tolist()) == [0, 1, 2, 3]
    for k in range(4):
        held = outputs.fold == k
        refit = clone(fitted_rf.estimator).fit(x[~held], y[~held])  # same options and seed, without fold k
        np.testing.assert_allclose(outputs.log_probs[held], predict_log_proba(refit, x[held]), atol=1e-6)
    in_sample = predict_log_proba(fitted_rf.estimator, x)
    assert np.abs(in_sample - outputs.log_probs).max() > 0.1
    # the leak: the forest is surer of the rows it was fitted on
    assert np.exp(in_sample.max(1)).mean() > np.exp(outputs.log_probs.max(1)).mean()


def test_in_sample_fit_stores_no_outputs(wine):
    fitted = fit_teacher(*RF, wine.train.x.numpy(), wine.train.y.numpy(), fit="in_sample", folds=4, seed=0)
    assert fitted.train_outputs is None


def test_served_log_probabilities_equal_predict_proba(wine, fitted_rf, tmp_path):
    path = tmp_path / file_name(RF[0])
    save_estimator(RF[0], fitted_rf.estimator, path)
    spec = TeacherSpec("rf", ModelRef(*RF), wine.shape)
    teacher = load_teacher(spec, str(path))
    assert isinstance(teacher, EstimatorTeacher)
    x = wine.test.x
    logits, feats = teacher.forward(x)
    probs = fitted_rf.estimator.predict_proba(x.numpy())
    np.testing.assert_allclose(logits.exp().numpy(), probs, atol=len(probs[0]) * PROB_FLOOR)
    assert feats == {} and torch.isfinite(logits).all()
    served = LocalTeachers(["rf"], [teacher]).request(x, torch.arange(len(x)), [()])()
    torch.testing.assert_close(served.logits[0], logits)
    with pytest.raises(ValueError, match="serves predictions only"):
        teacher.forward(x, ["hidden1"])


def test_every_estimator_saves_loads_and_predicts_the_same(wine, tmp_path):
    x, y = wine.train.x.numpy(), wine.train.y.numpy()
    for name, opts in [("HistGradientBoostingClassifier", {"max_iter": 10}),
                       ("ExtraTreesClassifier", {"n_estimators": 5}),
                       ("LogisticRegression", {}), ("SVC", {}), ("KNeighborsClassifier", {"n_neighbors": 3}),
                       ("MLPClassifier", {"max_iter": 50}), ("LGBMClassifier", {"n_estimators": 10}),
                       ("XGBClassifier", {"n_estimators": 10}), ("CatBoostClassifier", {"iterations": 10})]:
        estimator = fit_teacher(name, opts, x, y, fit="in_sample", folds=2, seed=0).estimator
        path = tmp_path / file_name(name)
        save_estimator(name, estimator, path)
        loaded_name, loaded = load_estimator(path)
        assert loaded_name == name
        np.testing.assert_allclose(predict_log_proba(loaded, wine.test.x.numpy()),
                                   predict_log_proba(estimator, wine.test.x.numpy()), atol=1e-6, err_msg=name)
        assert estimator_size(loaded, path) > 0


def test_a_skops_file_with_foreign_types_is_refused(tmp_path):
    import skops.io as sio

    path = tmp_path / "model.skops"
    sio.dump({"estimator": Foreign()}, path)
    with pytest.raises(ValueError, match="types hpmkd does not trust.*Foreign"):
        load_estimator(path)
    with pytest.raises(ValueError, match="not an estimator file"):
        load_estimator(tmp_path / "model.pkl")


class Foreign:
    pass


def test_options_are_checked_against_the_estimator():
    check_options("RandomForestClassifier", {"n_estimators": 5}, "teachers.0")
    with pytest.raises(ConfigError, match=r"teachers.0.options.n_estimatorz: unknown option.*'n_estimators'"):
        check_options("RandomForestClassifier", {"n_estimatorz": 5}, "teachers.0")
    with pytest.raises(ConfigError, match=r"teachers.0.options: RandomForestClassifier rejects.*n_estimators"):
        check_options("RandomForestClassifier", {"n_estimators": 0}, "teachers.0")
    with pytest.raises(ConfigError, match="probability"):
        check_options("SVC", {"probability": False}, "teachers.0")


def test_a_missing_booster_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightgbm", None)  # import lightgbm now raises ImportError
    with pytest.raises(ConfigError, match=r"teachers.1.model: LGBMClassifier needs the package 'lightgbm==4.7.0'.*"
                                          r"pip install 'hpmkd\[boosting\]'"):
        check_options("LGBMClassifier", {}, "teachers.1")


def test_the_provider_serves_estimator_names_only():
    assert provider_for(ModelRef("SVC")).kind == "sklearn"
    assert provider_for(ModelRef("mlp")).kind == "torch"
    assert EstimatorTeacher.size(ModelRef("SVC"), None) is None


def test_fold_outputs_round_trip_without_pickle(fitted_rf, tmp_path):
    path = tmp_path / "train_outputs.npz"
    fitted_rf.train_outputs.save(path)
    back = FoldOutputs.load(path)
    np.testing.assert_array_equal(back.log_probs, fitted_rf.train_outputs.log_probs)
    np.testing.assert_array_equal(back.fold, fitted_rf.train_outputs.fold)
    assert back.plan == fitted_rf.train_outputs.plan and back.plan.name == "oof:folds=4:seed=0"


def test_actors_serve_log_probabilities_and_the_cache_serves_each_row_out_of_fold(ray_session, wine, fitted_rf,
                                                                                   tmp_path):
    from hpmkd.components.logit_cache import CachedTeachers, ensure_cached
    from hpmkd.components.teacher_service import ActorTeachers, release, start_teacher_actors

    path = tmp_path / file_name(RF[0])
    save_estimator(RF[0], fitted_rf.estimator, path)
    outputs = tmp_path / "train_outputs.npz"
    fitted_rf.train_outputs.save(outputs)
    spec = TeacherSpec("rf", ModelRef(*RF), wine.shape)
    pools = start_teacher_actors([spec], [str(path)], cpus=1, gpus=0)
    try:
        x = wine.test.x
        served = ActorTeachers(["rf"], pools).request(x, torch.arange(len(x)), [()])()
        np.testing.assert_allclose(served.logits[0].exp().numpy(), fitted_rf.estimator.predict_proba(x.numpy()),
                                   atol=3 * PROB_FLOOR)
        root = str(tmp_path / "cache")
        stored = ensure_cached(pools, [spec], [str(path)], wine.train, root=root, fingerprint=wine.fingerprint,
                               dtype="float32", stored=[str(outputs)])[0][0]
        computed = ensure_cached(pools, [spec], [str(path)], wine.train, root=root, fingerprint=wine.fingerprint,
                                 dtype="float32")[0][0]
    finally:
        release(pools)
    from hpmkd.logit_cache import CachedLogits

    assert CachedLogits(stored.path).key.view.startswith("plain|oof:folds=4:seed=0:")
    assert CachedLogits(computed.path).key.view == "plain"
    assert stored.digest != computed.digest and not stored.hit
    rows = torch.tensor([0, 5, 17, 40])
    oof = CachedTeachers(["rf"], [[stored.path]]).request(wine.train.x[rows], rows, [()])().logits[0]
    np.testing.assert_allclose(oof.numpy(), fitted_rf.train_outputs.log_probs[rows.numpy()], atol=1e-6)
    in_sample = CachedTeachers(["rf"], [[computed.path]]).request(wine.train.x[rows], rows, [()])().logits[0]
    np.testing.assert_allclose(in_sample.numpy(), predict_log_proba(fitted_rf.estimator, wine.train.x[rows].numpy()),
                               atol=1e-5)
