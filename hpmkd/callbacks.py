"""Loop events: the fixed points where the training loop (:func:`hpmkd.training.train_stage`) calls callbacks.

========================  ==========================================================================================
event                     when
========================  ==========================================================================================
``on_start``              the model, objective, optimiser and LR schedule exist (and a resumed state is loaded)
``on_epoch_start``        an epoch begins (``state.epoch`` set), before its first batch
``after_backward``        the step's gradients exist, before the optimiser step
``after_step``            after the optimiser and LR-schedule step (``state.step`` counts it), before the objective
                          observes the step (its temperature schedule)
``on_evaluate``           an epoch's validation metrics are in ``metrics``; a callback may add its own
``end_of_epoch``          the epoch is recorded (``metrics`` final), before the checkpoint is written
``state_dict``            what the callback keeps in the checkpoint under ``state_key`` (``None``: nothing)
========================  ==========================================================================================

A callback class is registered in :data:`CALLBACKS` and says with :meth:`Callback.applies` whether a stage needs it
(as Composer's ``Algorithm.match``); the loop builds every one that applies, in name order. A new method adds loop
behaviour with one such class: the meta-learned temperature below is one. Callbacks may change what the loop uses
next: ``state.optimizer`` and ``state.scheduler`` (a sampling phase that switches to a Langevin optimiser), the
objective's method weights (terms that switch on by stage). When a stage resumes, every callback's
``load_state_dict`` runs before ``on_start``, and the optimiser's and LR schedule's states are restored after
``on_start``: a callback that puts another optimiser in place for the phase it resumes in gets its state back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch
from torch import Tensor, nn

from hpmkd.registry import ConfigError, Registry

if TYPE_CHECKING:
    from hpmkd.data import DataSplits
    from hpmkd.distill_batch import TeacherOutputs
    from hpmkd.distiller import StepOutput
    from hpmkd.training import StageEnv, StageSpec


@dataclass
class Batch:
    """One training step's inputs: the view trained on, labels, row indices, teacher outputs and the objective's
    keyword arguments (epoch, reference logits)."""

    x: Tensor
    y: Tensor
    index: Tensor
    teachers: TeacherOutputs | None
    kwargs: dict[str, Any]


@dataclass
class LoopState:
    """What callbacks read (and may change): the stage, its parts and where training is."""

    spec: StageSpec
    env: StageEnv
    splits: DataSplits
    model: nn.Module
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0
    batch: Batch | None = None
    out: StepOutput | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.spec.train.epochs * self.steps_per_epoch

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class Callback:
    """Base class: every hook does nothing; ``state_key`` names the callback's entry in the checkpoint."""

    state_key: ClassVar[str | None] = None

    @classmethod
    def applies(cls, state: LoopState) -> bool:
        return True

    def on_start(self, state: LoopState) -> None: ...

    def on_epoch_start(self, state: LoopState) -> None: ...

    def after_backward(self, state: LoopState) -> None: ...

    def after_step(self, state: LoopState) -> None: ...

    def on_evaluate(self, state: LoopState, metrics: dict[str, float]) -> None: ...

    def end_of_epoch(self, state: LoopState, metrics: dict[str, float]) -> None: ...

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None: ...


CALLBACKS: Registry[Callback] = Registry("callback")


def build_callbacks(state: LoopState) -> list[Callback]:
    """Every registered callback that applies to this stage, in name order."""
    return [CALLBACKS.get(name)() for name in CALLBACKS.names() if CALLBACKS.get(name).applies(state)]


def held_out_batches(splits: DataSplits, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled batches of the meta split (the outer objective of a schedule learned from held-out data)."""
    if splits.meta is None or not len(splits.meta):
        raise ConfigError("data.meta_fraction: the temperature schedule learns T from a held-out part of the training "
                          "split (the meta split), but this split plan has none; set data.meta_fraction > 0 (e.g. "
                          "0.05), or null to let the config choose.")
    epoch = 0
    while True:
        for x, y, _ in splits.meta.batches(batch_size, shuffle=True, seed=seed + 7, epoch=epoch):
            yield x, y
        epoch += 1


@CALLBACKS.register("meta_temperature")
class MetaTemperatureStep(Callback):
    """Every ``distill.meta_interval`` optimisation steps, one hypergradient step of a temperature learned from
    held-out data (:meth:`hpmkd.distiller.Distiller.meta_step`) on the step's batch and the next batch of the meta
    split (a held-out part of the training split, :mod:`hpmkd.data.splits`; never the validation split, which
    selects the epoch and scores search trials), at the current learning rate; with several workers the temperature
    is averaged so every worker keeps the same one."""

    @classmethod
    def applies(cls, state: LoopState) -> bool:
        schedule = getattr(state.objective, "schedule", None)
        return getattr(schedule, "learns_from_held_out", False)

    def on_start(self, state: LoopState) -> None:
        self.held_out = held_out_batches(state.splits, state.spec.train.batch_size, state.spec.seed)

    def after_step(self, state: LoopState) -> None:
        if state.step % state.spec.distill.meta_interval:
            return
        batch, device = state.batch, state.env.device
        x_held, y_held = next(self.held_out)
        state.objective.meta_step((batch.x, batch.y, batch.index, batch.teachers),
                                  (x_held.to(device), y_held.to(device)), state.lr, **batch.kwargs)
        with torch.no_grad():
            for p in state.objective.schedule.parameters():
                p.copy_(state.env.all_reduce_mean(p.detach().clone()))


@CALLBACKS.register("temperature_metric")
class TemperatureMetric(Callback):
    """The epoch's last temperature as metric ``temperature`` (objectives with a temperature schedule)."""

    @classmethod
    def applies(cls, state: LoopState) -> bool:
        return state.objective.temperature_value() is not None

    def on_evaluate(self, state: LoopState, metrics: dict[str, float]) -> None:
        metrics["temperature"] = state.objective.temperature_value()


@CALLBACKS.register("teacher_weight_metric")
class TeacherWeightMetric(Callback):
    """Each teacher's mean per-sample weight over the epoch as metric ``teacher_weight.<name>``."""

    @classmethod
    def applies(cls, state: LoopState) -> bool:
        return bool(state.spec.teacher_names)

    def on_start(self, state: LoopState) -> None:
        self.sum: Tensor | None = None
        self.seen = 0

    def after_step(self, state: LoopState) -> None:
        weights = state.out.teacher_weights
        if weights is None:
            return
        self.sum = weights.sum(0) if self.sum is None else self.sum + weights.sum(0)
        self.seen += len(weights)

    def on_evaluate(self, state: LoopState, metrics: dict[str, float]) -> None:
        if self.sum is not None:
            for name, w in zip(state.spec.teacher_names, (self.sum / max(1, self.seen)).tolist()):
                metrics[f"teacher_weight.{name}"] = w
        self.sum, self.seen = None, 0
