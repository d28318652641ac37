"""ROC-AUC and ECE test metrics against scikit-learn and a hand count; estimator teachers in the chain planner
and the teacher-output sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from hpmkd.config import config_from_data
from hpmkd import evaluation
from hpmkd.evaluation import EvaluationConfig, Predictions
from hpmkd.metrics import auc
from hpmkd.pipelines import plan_experiment
from hpmkd.registry import ConfigError
from hpmkd.uncertainty_metrics import ece


def predictions(probs, y) -> Predictions:
    return Predictions(torch.tensor(probs, dtype=torch.float64).log(), torch.tensor(y))


def test_binary_and_macro_one_vs_rest_auc_are_scikit_learns():
    binary = predictions([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]], [0, 1, 1, 0])
    assert auc(binary)["auc"] == pytest.approx(0.5)  # positives 0.6, 0.3 against negatives 0.1, 0.8: 2 of 4 pairs
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), 50)
    y = rng.integers(0, 4, 50)
    expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert auc(predictions(probs, y))["auc"] == pytest.approx(expected)
    assert auc(predictions(probs[:5], [1] * 5)) == {}  # one class in the labels: undefined


def test_ece_by_hand_and_accuracy_and_log_loss_match_scikit_learn():
    probs = [[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]
    y = [0, 1, 1, 1]
    # top-label confidences 0.95 (right), 0.9 (wrong), 0.7 (right), 0.6 (wrong); bins of width 1/15:
    # {0.95}: |1 - 0.95|, {0.9}: |0 - 0.9|, {0.7}: |1 - 0.7|, {0.6}: |0 - 0.6|, each of weight 1/4
    assert ece(predictions(probs, y), EvaluationConfig())["ece"] == pytest.approx((0.05 + 0.9 + 0.3 + 0.6) / 4)
    class Table:
        x = torch.tensor(probs, dtype=torch.float32).log()

        def __len__(self):
            return 4

        def batches(self, batch_size, *, shuffle, seed=0, epoch=0, rank=0, world_size=1):
            yield self.x, torch.tensor(y), torch.arange(4)

    acc, nll = evaluation.evaluate(torch.nn.Identity(), Table(), 4, torch.device("cpu"))
    assert acc == pytest.approx(accuracy_score(y, np.argmax(probs, 1)))
    assert nll == pytest.approx(log_loss(y, probs), rel=1e-6)
    assert {"test_auc", "test_ece", "test_brier"} <= set(evaluation.test_metrics(predictions(probs, y)))


def config(**extra) -> dict:
    return {"experiment": "t", "pipeline": "hpmkd", "data": {"name": "breast_cancer"},
            "teachers": [{"name": "rf", "model": "RandomForestClassifier", "options": {"n_estimators": 5}}],
            "student": {"model": "mlp", "options": {"hidden": 8, "depth": 1}},
            "config_manager": {"enabled": False}, **extra}


def test_a_chain_from_an_estimator_teacher_needs_its_assistants_by_hand():
    with pytest.raises(ConfigError, match=r"chain.assistants: .*rf \(an estimator\) is known only once fitted"):
        plan_experiment(config_from_data(config()))
    assistants = {"assistants": [{"model": "mlp", "options": {"hidden": 32}}]}
    plan = plan_experiment(config_from_data(config(chain=assistants)))
    kinds = {s.name: s.kind for s in plan.stages}
    assert kinds["teacher_rf"] == "fit_teacher" and kinds["assistant_1"] == "chain_link"
    record = next(s for s in plan.stages if s.kind == "chain_plan").params.plan
    assert record["models"][0]["params"] is None and record["ratios"][0] is None


def test_out_of_fold_outputs_refuse_sources_that_cannot_serve_them():
    with pytest.raises(ConfigError, match="distill.teacher_outputs: 'online' cannot serve stored out-of-fold"):
        config_from_data(config(distill={"teacher_outputs": "online"}, chain={"assistants": []}))
    config_from_data(config(distill={"teacher_outputs": "online"}, chain={"assistants": []},
                            tabular={"teacher_fit": "in_sample"}))
    with pytest.raises(ConfigError, match="tabular.folds: out-of-fold outputs need at least 2 folds"):
        config_from_data(config(tabular={"folds": 1}))
