"""The Meta-MLP ensemble teacher: the stacked model, the held-out rows its base teachers never train on (through the
real training loop), and the head fitted on those rows and selected on validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpmkd.callbacks import CALLBACKS, Callback
from hpmkd.config import DataConfig, TrainConfig
from hpmkd.data import load_dataset
from hpmkd.data.holdout import HoldOut
from hpmkd.meta_fit import MetaTrain, accuracy_and_loss, fit_head
from hpmkd.models import create_model
from hpmkd.models.meta_mlp import stacked
from hpmkd.models.ref import DataShape, ModelRef
from hpmkd.predictors import SingleModel, load_predictor, save_predictor
from hpmkd.teachers import load_teacher, TeacherSpec
from hpmkd.training import StageEnv, StageSpec, train_stage

MEMBERS = [{"model": "mlp", "options": {"hidden": 16, "depth": 1}},
           {"model": "mlp", "options": {"hidden": 8, "depth": 2}}]
SHAPE = DataShape(3, (4,))


def test_the_stacked_model_is_a_head_on_its_frozen_members_and_a_teacher_like_any_other(tmp_path):
    torch.manual_seed(0)
    ref = ModelRef("meta_mlp", {"members": MEMBERS, "hidden": 5})
    model = ref.build(SHAPE)
    x = torch.randn(6, 4)
    z = torch.stack([m(x) for m in model.members])
    by_hand = model.head(torch.cat([F.softmax(z[0], -1), F.softmax(z[1], -1)], 1))
    model.train()
    assert not model.members[0].training and not any(p.requires_grad for p in model.members.parameters())
    torch.testing.assert_close(model(x), by_hand)
    assert stacked(z, "logits").shape == (6, 6) and torch.equal(stacked(z, "logits")[:, 3:], z[1])
    assert model.taps.feature_taps == () and model.taps.classifier_tap == "head.2"
    path = tmp_path / "model.pt"
    save_predictor(SingleModel(model).payload(), path)  # one file: members' and head's weights
    teacher = load_teacher(TeacherSpec("meta", ref, SHAPE), str(path))
    logits, feats = teacher.forward(x)
    torch.testing.assert_close(logits, by_hand.detach())
    torch.testing.assert_close(load_predictor(str(path), ref, SHAPE)(x), by_hand.detach())
    with pytest.raises(Exception, match="members"):
        create_model("meta_mlp", num_classes=3, in_channels=4, input_shape=(4,))


def test_the_holdout_is_stratified_fixed_by_its_seed_and_disjoint_from_the_rest():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 10)
    kept, held = HoldOut(0.25, seed=3).split(labels)
    assert len(held) == 10 and sorted(torch.cat([kept, held]).tolist()) == list(range(40))
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 5, 3] or \
        torch.bincount(labels[held], minlength=3).tolist() == [3, 5, 2]
    assert torch.equal(HoldOut(0.25, seed=3).split(labels)[1], held)
    assert not torch.equal(HoldOut(0.25, seed=4).split(labels)[1], held)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        HoldOut(1.0)


class RowsSeen(Callback):
    """The training split's parent rows every step of the stage read."""

    rows: set[int] = set()

    @classmethod
    def applies(cls, state):
        return state.spec.name == "held_out_teacher"

    def after_step(self, state):
        self.rows |= set(state.batch.index.tolist())  # a RowSubset's batches carry the parent's row ids


def test_a_teacher_never_trains_on_the_rows_the_meta_mlp_is_fitted_on(monkeypatch):
    monkeypatch.setitem(CALLBACKS._entries, "zz_rows_seen", RowsSeen)
    RowsSeen.rows = set()
    data = DataConfig(name="digits")
    holdout = HoldOut(0.2, seed=0)
    spec = StageSpec("held_out_teacher", 0, data, ModelRef("mlp", {"hidden": 16, "depth": 1}),
                     TrainConfig(epochs=2, batch_size=64), holdout=holdout)
    train_stage(spec, StageEnv())
    splits = load_dataset("digits", **data.loader_kwargs(0))
    fit_rows = set(holdout.held(splits.train).positions.tolist())  # what the meta_mlp stage fits the head on
    assert len(fit_rows) == round(0.2 * len(splits.train))
    assert RowsSeen.rows and not RowsSeen.rows & fit_rows
    assert RowsSeen.rows | fit_rows == set(range(len(splits.train)))


def test_the_head_is_fitted_on_the_held_out_outputs_and_selected_on_validation():
    torch.manual_seed(1)
    # teacher 0 is sure and right on classes 0 and 1, and says 0 unsurely for class 2; teacher 1 always says 2, more
    # surely: their mean is wrong on classes 0 and 1, but what each says (and how surely) identifies the class
    y = torch.randint(0, 3, (300,))
    z0 = torch.where((y < 2)[:, None], 4 * F.one_hot(y, 3).float(), 1.5 * F.one_hot(torch.zeros_like(y), 3).float())
    z = torch.stack([z0, 5 * F.one_hot(torch.full_like(y, 2), 3).float()])
    x = stacked(z, "probs")
    head = create_model("meta_mlp", num_classes=3, in_channels=1, input_shape=(1,), members=MEMBERS).head
    fit = fit_head(head, (x[:200], y[:200]), (x[200:], y[200:]), MetaTrain(epochs=30, lr=0.01, batch_size=50), 0)
    best = max(range(30), key=lambda e: (fit.history[e]["val_acc"], -e))
    assert fit.epoch == best and fit.val_acc == fit.history[best]["val_acc"] > 0.9
    head.load_state_dict(fit.state)
    assert accuracy_and_loss(head, x[200:], y[200:]) == pytest.approx((fit.val_acc, fit.val_loss))
    mean_of_teachers = (z.softmax(-1).mean(0).argmax(1)[200:] == y[200:]).float().mean()
    assert float(mean_of_teachers) < 0.5 < 0.9 < fit.val_acc
