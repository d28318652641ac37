"""What a training stage selects: a callback that watches the epochs and, at the end, gives the stage's predictor.

:class:`BestEpoch` (the default, ``StageSpec.selection = "best_epoch"``) keeps the weights of the epoch with the best
validation accuracy: model selection on validation, never on test. Another selection (a set of posterior weight
samples collected while sampling) is one registered :class:`Selection` subclass. A selection's state is part of the
checkpoint (under its ``state_key``), so a resumed stage selects as an uninterrupted one; :func:`selected_payload`
reads the predictor checkpoint (:mod:`hpmkd.predictors`) back out of a stage's saved state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import nn

from hpmkd.callbacks import Callback, LoopState
from hpmkd.predictors import SingleModel, predictor_from_payload
from hpmkd.registry import Registry

SELECTION_KEY = "selection"


class Selection(Callback, ABC):
    """Base class: :meth:`payload` is the selected predictor's checkpoint payload; :meth:`predictor` builds it."""

    name: ClassVar[str]

    @abstractmethod
    def payload(self) -> Any:
        """The selected predictor's checkpoint payload (:mod:`hpmkd.predictors`)."""

    def summary(self) -> dict[str, float]:
        """What the stage reports about its selection (``val_acc`` of the selected predictor, ``selected_epoch``)."""
        return {}

    def predictor(self, state: LoopState) -> nn.Module:
        return predictor_from_payload(state.spec.model, state.splits.shape, self.payload()).to(state.env.device)

    @classmethod
    @abstractmethod
    def payload_from_state(cls, state: dict[str, Any]) -> Any:
        """The selected predictor's payload from a saved training state (the last epoch's checkpoint)."""


SELECTIONS: Registry[Selection] = Registry("selection")


@SELECTIONS.register("best_epoch")
class BestEpoch(Selection):
    """The weights of the epoch with the best validation accuracy (the first such epoch on ties)."""

    name = "best_epoch"
    state_key = "best"

    def __init__(self) -> None:
        self.best: dict[str, Any] = {"val_acc": -1.0, "epoch": -1, "model": None}

    def on_evaluate(self, state: LoopState, metrics: dict[str, float]) -> None:
        if metrics["val_acc"] > self.best["val_acc"]:
            self.best = {"val_acc": metrics["val_acc"], "epoch": state.epoch,
                         "model": SingleModel(state.model).payload()}

    def state_dict(self) -> Any:
        return self.best

    def load_state_dict(self, state: Any) -> None:
        self.best = state

    def payload(self) -> Any:
        return self.best["model"]

    def predictor(self, state: LoopState) -> nn.Module:
        """The stage's own model, with the selected weights."""
        state.model.load_state_dict(self.best["model"])
        return SingleModel(state.model)

    def summary(self) -> dict[str, float]:
        return {"val_acc": self.best["val_acc"], "selected_epoch": self.best["epoch"]}

    @classmethod
    def payload_from_state(cls, state: dict[str, Any]) -> Any:
        return state[cls.state_key]["model"]


def selected_payload(state: dict[str, Any]) -> Any:
    """The predictor payload a saved training state selected (states without a ``selection`` entry are
    :class:`BestEpoch`'s, as every state written before selections were named)."""
    return SELECTIONS.get(state.get(SELECTION_KEY, BestEpoch.name), "checkpoint selection").payload_from_state(state)
