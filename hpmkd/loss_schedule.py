"""Staged loss weights: which KD terms are active, and with what weight, by fraction of training.

``distill.schedule`` lists phases, each starting at a fraction of the stage's optimisation steps and naming the
methods active in it (a list, or a mapping method -> multiplier of its ``distill.methods.<m>.weight``); a method a
phase does not name has weight 0 there (and is not computed, :class:`hpmkd.distiller.Distiller`). With ``S`` steps
in the stage, phase ``k`` begins at step ``b_k = ⌈start_k · S⌉``; step ``s`` (0-based: the ``s``-th optimisation
step) uses the last phase with ``b_k ≤ s``. With ``ramp > 0`` a weight that changes at ``b_k`` moves linearly from
its previous phase's value to the new one over ``R = ramp · S`` steps: step ``b_k + j`` uses
``m_{k−1} + (m_k − m_{k−1}) · min(1, (j + 1) / R)``.

This is HumP-KD's multi-stage KD, "three distillation stages progressively activated across training" (Mainuddin,
Tabassum, Shahid, Khan, arXiv 2606.14684; only the abstract is public, so the phases, their boundaries and the
ramp are our reconstruction, e.g. ``[{start: 0, active: [kd]}, {start: 0.333, active: [kd, hierarchical]},
{start: 0.667, active: [kd, hierarchical, at]}]``), usable with any recipe in any pipeline.

:class:`LossScheduleStep` is the loop callback (:mod:`hpmkd.callbacks`) that sets the distiller's method weights
before every step (at ``on_start``, then ``after_step``); the weights are a function of the step alone, so a resumed
stage continues with the right ones. The epoch's last weights are recorded as metrics ``weight.<method>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hpmkd.callbacks import CALLBACKS, Callback, LoopState
from hpmkd.config_schema import join
from hpmkd.registry import ConfigError, did_you_mean


@dataclass
class LossPhase:
    """One phase: from ``start`` (a fraction of training in ``[0, 1)``) the methods ``active``, each with a
    multiplier of its weight (a list gives every named method multiplier 1)."""

    start: float
    active: list[str] | dict[str, float] = field(default_factory=list)

    def multipliers(self) -> dict[str, float]:
        return {name: 1.0 for name in self.active} if isinstance(self.active, list) else dict(self.active)


@dataclass
class LossSchedule:
    """The phases (the first starts at 0, starts strictly increasing) and the ramp (a fraction of training)."""

    phases: list[LossPhase] = field(default_factory=list)
    ramp: float = 0.0

    def check(self, path: str) -> None:
        if not self.phases:
            raise ConfigError(f"{join(path, 'phases')}: a schedule needs at least one phase, e.g. phases: "
                              f"[{{start: 0, active: [kd]}}, {{start: 0.5, active: [kd, hierarchical]}}].")
        starts = [p.start for p in self.phases]
        if starts[0] != 0:
            raise ConfigError(f"{join(path, 'phases')}.0.start: the first phase starts at 0, got {starts[0]}.")
        if any(not 0 <= s < 1 for s in starts) or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ConfigError(f"{join(path, 'phases')}: starts must increase strictly within [0, 1), got {starts}.")
        if not 0 <= self.ramp < 1:
            raise ConfigError(f"{join(path, 'ramp')}: a fraction of training in [0, 1), got {self.ramp}.")
        for i, phase in enumerate(self.phases):
            for name, value in phase.multipliers().items():
                if value < 0:
                    raise ConfigError(f"{join(path, f'phases.{i}.active')}.{name}: a multiplier is >= 0, got {value}.")

    def check_methods(self, methods: list[str], path: str) -> None:
        """Every method a phase names is one of ``methods``, and every one of ``methods`` is active somewhere."""
        for i, phase in enumerate(self.phases):
            for name in phase.multipliers():
                if name not in methods:
                    raise ConfigError(f"{join(path, f'phases.{i}.active')}: {name!r} is not a method of "
                                      f"distill.methods.{did_you_mean(name, methods)} Methods: {', '.join(methods)}.")
        idle = [m for m in methods if not any(p.multipliers().get(m, 0) > 0 for p in self.phases)]
        if idle:
            raise ConfigError(f"{join(path, 'phases')}: method {idle[0]!r} is active in no phase; add it to a phase "
                              f"or remove it from distill.methods.")

    def boundaries(self, total_steps: int) -> list[int]:
        """``b_k = ⌈start_k · S⌉``, the first step of each phase."""
        return [math.ceil(p.start * total_steps - 1e-9) for p in self.phases]

    def multipliers_at(self, step: int, total_steps: int, methods: list[str]) -> dict[str, float]:
        """Each method's multiplier for step ``step`` of ``total_steps`` (module docstring)."""
        bounds = self.boundaries(total_steps)
        k = max(i for i, b in enumerate(bounds) if b <= step)
        now = self.phases[k].multipliers()
        values = {m: now.get(m, 0.0) for m in methods}
        ramp_steps = self.ramp * total_steps
        if k == 0 or ramp_steps <= 0 or step - bounds[k] + 1 >= ramp_steps:
            return values
        before = self.phases[k - 1].multipliers()
        progress = min(1.0, (step - bounds[k] + 1) / ramp_steps)
        return {m: before.get(m, 0.0) + (values[m] - before.get(m, 0.0)) * progress for m in methods}


@CALLBACKS.register("loss_schedule")
class LossScheduleStep(Callback):
    """Sets the distiller's method weights from ``distill.schedule`` before every step (module docstring)."""

    @classmethod
    def applies(cls, state: LoopState) -> bool:
        return state.spec.distill is not None and state.spec.distill.schedule is not None

    def on_start(self, state: LoopState) -> None:
        self.base = {name: weight for name, (weight, _) in state.spec.distill.method_options().items()}
        self.apply(state)

    def after_step(self, state: LoopState) -> None:
        self.apply(state)

    def apply(self, state: LoopState) -> None:
        schedule: LossSchedule = state.spec.distill.schedule
        for name, multiplier in schedule.multipliers_at(state.step, state.total_steps, list(self.base)).items():
            state.objective.method_weights[name] = self.base[name] * multiplier

    def on_evaluate(self, state: LoopState, metrics: dict[str, float]) -> None:
        """The weights of the epoch's last step, as ``weight.<method>``."""
        schedule: LossSchedule = state.spec.distill.schedule
        last = schedule.multipliers_at(max(0, state.step - 1), state.total_steps, list(self.base))
        metrics.update({f"weight.{name}": self.base[name] * m for name, m in last.items()})
