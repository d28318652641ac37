"""Temperature schedules: the distillation temperature ``T`` of every training step.

A schedule is a small ``nn.Module`` built as ``SCHEDULES.build(name, options)``. The training loop asks
:meth:`TemperatureSchedule.current` for this step's ``T`` (a 0-dim tensor), calls
:meth:`TemperatureSchedule.observe` with a :class:`ScheduleState` after every optimisation step, and saves the
schedule with the objective's ``state_dict`` (its running statistics are buffers, so a checkpoint restores them).
The ``meta`` schedule also learns ``T`` from batches of held-out data (the meta split, a part of the training split
held out for it; never the validation split, which selects epochs) through :meth:`MetaTemperature.hyper_step`
(``learns_from_held_out = True``).

The HPM-KD meta-temperature scheduler (Haase & Dourado da Silva, arXiv 2512.09886; equations from the authors'
draft, ``guhaase/papers-deepbridge`` ``01_HPM-KD_Framework/POR/sections/04-methodology.tex``) writes every adaptive
schedule as ``T(t) = T_min + (T_max − T_min) · s(t)`` with ``s ∈ [0, 1]``, so every schedule here stays in
``[T_min, T_max]`` (defaults 2 and 6, the paper's range; initial ``T`` 4).
"""

from __future__ import annotations

import copy
import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from hpmkd.registry import Registry


@dataclass
class ScheduleState:
    """Where training is after an optimisation step: ``step`` steps done out of ``total_steps``, the current
    ``epoch`` (0-based) of ``total_epochs``, and that step's training loss."""

    step: int
    total_steps: int
    epoch: int
    total_epochs: int
    train_loss: float


class TemperatureSchedule(nn.Module, ABC):
    """Base class. Subclasses give :meth:`current` and, when ``T`` follows training, :meth:`observe`."""

    learns_from_held_out: ClassVar[bool] = False

    @abstractmethod
    def current(self) -> Tensor:
        """This step's temperature, a 0-dim tensor."""

    def observe(self, state: ScheduleState) -> None:
        """Advance after an optimisation step. The base schedule does not follow training."""

    def value(self) -> float:
        """This step's temperature as a float (for logging)."""
        return float(self.current().detach())

    @classmethod
    def initial_range(cls, **options: Any) -> tuple[float, float] | None:
        """The closed interval of initial temperatures (option ``T``) the schedule accepts with its other
        ``options``; ``None`` when it takes no ``T`` (what a search over ``T`` may propose)."""
        return None


SCHEDULES: Registry[TemperatureSchedule] = Registry("temperature schedule")


def check_range(T_min: float, T_max: float) -> tuple[float, float]:
    T_min, T_max = float(T_min), float(T_max)
    if not (0 < T_min <= T_max and math.isfinite(T_max)):
        raise ValueError(f"need 0 < T_min <= T_max (finite), got T_min={T_min}, T_max={T_max}.")
    return T_min, T_max


def check_initial(T: float, T_min: float, T_max: float) -> float:
    T = float(T)
    if not T_min <= T <= T_max:
        raise ValueError(
            f"the initial T={T} lies outside [T_min, T_max] = [{T_min}, {T_max}]; move T or widen the range."
        )
    return T


def check_momentum(momentum: float) -> float:
    momentum = float(momentum)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum (the EMA factor of the train loss) must be in [0, 1), got {momentum}.")
    return momentum


def finite_loss(state: ScheduleState) -> float:
    loss = float(state.train_loss)
    if not math.isfinite(loss):
        raise ValueError(f"temperature schedule observed a non-finite train loss ({loss}) at step {state.step}.")
    return loss


def progress(state: ScheduleState) -> float:
    """``t / t_max``: steps done over total steps, clipped to ``[0, 1]``."""
    if state.total_steps < 1:
        raise ValueError(f"ScheduleState.total_steps must be >= 1, got {state.total_steps}.")
    return min(max(state.step / state.total_steps, 0.0), 1.0)


class RangedSchedule(TemperatureSchedule):
    """``T = T_min + (T_max − T_min) · s`` with ``s`` clipped to ``[0, 1]``; ``T`` is kept in a buffer."""

    def __init__(self, T_min: float, T_max: float, initial: float):
        super().__init__()
        self.T_min, self.T_max = check_range(T_min, T_max)
        self.register_buffer("temperature", torch.tensor(float(initial)))

    def current(self) -> Tensor:
        return self.temperature.clone()

    def set_fraction(self, s: float) -> None:
        s = min(max(s, 0.0), 1.0)
        self.temperature.fill_(self.T_min + (self.T_max - self.T_min) * s)

    @classmethod
    def initial_range(cls, **options: Any) -> tuple[float, float] | None:
        """``[T_min, T_max]`` for the schedules that take an initial ``T`` (``loss_based``, ``convergence``)."""
        return bounds_option(cls, options)


def bounds_option(schedule: type, options: dict[str, Any]) -> tuple[float, float] | None:
    """``(T_min, T_max)`` of ``options`` (the schedule's defaults where absent); ``None`` when ``schedule`` takes no
    initial ``T`` or the options are not numbers."""
    params = inspect.signature(schedule.__init__).parameters
    if "T" not in params:
        return None
    try:
        return check_range(*(options.get(k, params[k].default) for k in ("T_min", "T_max")))
    except (TypeError, ValueError):
        return None


@SCHEDULES.register("fixed")
class FixedTemperature(TemperatureSchedule):
    """A constant ``T`` (Hinton et al. 2015; default 4, the RepDistiller / CA-MKD CIFAR-100 value)."""

    def __init__(self, T: float = 4.0):
        super().__init__()
        T = float(T)
        if not (T > 0 and math.isfinite(T)):
            raise ValueError(f"T must be a positive number, got {T}.")
        self.register_buffer("temperature", torch.tensor(T))

    def current(self) -> Tensor:
        return self.temperature.clone()

    @classmethod
    def initial_range(cls, **options: Any) -> tuple[float, float]:
        return (0.0, math.inf)


@SCHEDULES.register("linear")
class LinearTemperature(RangedSchedule):
    """Linear decay from ``T_max`` to ``T_min`` over training: ``s(t) = 1 − t / t_max``, ``t_max`` = total steps
    (the HPM-KD authors' measured runs decay ``T`` linearly, ``T_e = T0 · (1 − 0.5 e / E)`` in ``train_hpmkd_simple``
    of ``guhaase/papers-deepbridge`` ``01_HPM-KD_Framework/POR/experiments/scripts/01b_compression_ratios.py``; the
    endpoints are ours)."""

    def __init__(self, T_min: float = 2.0, T_max: float = 6.0):
        super().__init__(T_min, T_max, initial=T_max)

    def observe(self, state: ScheduleState) -> None:
        self.set_fraction(1.0 - progress(state))


@SCHEDULES.register("cosine")
class CosineTemperature(RangedSchedule):
    """HPM-KD MTS cosine strategy (arXiv 2512.09886, authors' draft ``04-methodology.tex``):
    ``s(t) = (1 + cos(π t / t_max)) / 2`` with ``t_max`` the total number of steps (the draft writes ``T_max``, a
    typo), so ``T`` goes from ``T_max`` to ``T_min``."""

    def __init__(self, T_min: float = 2.0, T_max: float = 6.0):
        super().__init__(T_min, T_max, initial=T_max)

    def observe(self, state: ScheduleState) -> None:
        self.set_fraction((1.0 + math.cos(math.pi * progress(state))) / 2.0)


@SCHEDULES.register("loss_based")
class LossBasedTemperature(RangedSchedule):
    """HPM-KD MTS loss-based strategy (arXiv 2512.09886, authors' draft ``04-methodology.tex``):
    ``s = (L − L_min) / (L_max − L_min)``.

    Our choices (options): ``L`` is an exponential moving average of the train loss,
    ``L ← m · L + (1 − m) · loss`` (``momentum`` m, default 0.98; started at the first loss), and ``L_min``,
    ``L_max`` are the running minimum and maximum of that average. Until they differ ``T`` stays at its initial
    value ``T``.
    """

    def __init__(self, T: float = 4.0, T_min: float = 2.0, T_max: float = 6.0, momentum: float = 0.98):
        T_min, T_max = check_range(T_min, T_max)
        super().__init__(T_min, T_max, initial=check_initial(T, T_min, T_max))
        self.momentum = check_momentum(momentum)
        self.register_buffer("ema", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("low", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("high", torch.tensor(-math.inf, dtype=torch.float64))
        self.register_buffer("seen", torch.tensor(0, dtype=torch.int64))

    def observe(self, state: ScheduleState) -> None:
        loss = finite_loss(state)
        ema = loss if int(self.seen) == 0 else self.momentum * float(self.ema) + (1.0 - self.momentum) * loss
        low, high = min(float(self.low), ema), max(float(self.high), ema)
        self.ema.fill_(ema)
        self.low.fill_(low)
        self.high.fill_(high)
        self.seen += 1
        if high - low > 1e-12 * max(1.0, abs(high)):
            self.set_fraction((ema - low) / (high - low))


@SCHEDULES.register("convergence")
class ConvergenceTemperature(RangedSchedule):
    """HPM-KD MTS convergence strategy (arXiv 2512.09886, authors' draft ``04-methodology.tex``):
    ``s = exp(−λ · |dL/dt|)``: ``T`` is low while the loss moves fast and rises toward ``T_max`` as training
    converges.

    Our choices (options): ``L`` is an exponential moving average of the train loss (``momentum`` m, default 0.98,
    started at the first loss); ``dL/dt`` is measured per epoch, the change of ``L`` over one step times the steps
    per epoch, smoothed by an EMA with the same ``m`` (a per-step difference alone is mostly noise); ``λ`` is
    ``lam`` (default 5, so a loss falling 0.1 per epoch gives ``s ≈ 0.6``). ``T`` starts at ``T`` and changes from
    the second observation on.
    """

    def __init__(
        self, T: float = 4.0, T_min: float = 2.0, T_max: float = 6.0, momentum: float = 0.98, lam: float = 5.0
    ):
        T_min, T_max = check_range(T_min, T_max)
        super().__init__(T_min, T_max, initial=check_initial(T, T_min, T_max))
        self.momentum = check_momentum(momentum)
        self.lam = float(lam)
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lam (λ) must be >= 0, got {lam}.")
        self.register_buffer("ema", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("slope", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("seen", torch.tensor(0, dtype=torch.int64))

    def observe(self, state: ScheduleState) -> None:
        loss = finite_loss(state)
        seen = int(self.seen)
        self.seen += 1
        if seen == 0:
            self.ema.fill_(loss)
            return
        previous = float(self.ema)
        ema = self.momentum * previous + (1.0 - self.momentum) * loss
        steps_per_epoch = state.total_steps / max(1, state.total_epochs)
        rate = (ema - previous) * steps_per_epoch
        slope = rate if seen == 1 else self.momentum * float(self.slope) + (1.0 - self.momentum) * rate
        self.ema.fill_(ema)
        self.slope.fill_(slope)
        self.set_fraction(math.exp(-self.lam * abs(slope)))


META_OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("meta optimizer")
META_OPTIMIZERS.register("adam")(torch.optim.Adam)
META_OPTIMIZERS.register("sgd")(torch.optim.SGD)

TrainLossFn = Callable[[dict[str, Tensor], Tensor], Tensor]
ValLossFn = Callable[[dict[str, Tensor]], Tensor]


@SCHEDULES.register("meta")
class MetaTemperature(TemperatureSchedule):
    """A temperature learned from held-out data by a one-step look-ahead hypergradient (HPM-KD's "meta-temperature"
    idea, arXiv 2512.09886; the authors' library, ``DeepBridge-Validation/DeepBridge``
    ``deepbridge/distillation/techniques/hpm/``, fits an MLP regressor on training-state features instead, so this
    hypergradient form is our choice, in the style of DARTS / MAML one-step unrolling)::

        T = T_min + (T_max − T_min) · sigmoid(ρ)             (ρ an nn.Parameter; starts so that T = T)
        θ' = θ − η · ∇_θ L_train(θ, T)                       (one SGD step on the distillation loss, graph kept)
        g_T = d L_meta(θ') / d T                             (the student's held-out loss after that step)
        ρ ← optimiser step on ρ with gradient g_T · dT/dρ    (Adam or SGD, ``meta_optimizer``, lr ``meta_lr``)

    So it minimises the held-out loss (in hpmkd the student's cross-entropy on the meta split, a part of the training
    split held out for this, :mod:`hpmkd.data.splits`) reached after one SGD step of size ``η`` (the student's
    current learning rate) on the distillation loss at temperature ``T``. The validation split, which selects the
    epoch and scores search trials, is never this objective: ``T`` is not fitted on the data that judges it.
    ``T`` never leaves ``(T_min, T_max)``. :meth:`observe` does nothing: ``T`` changes only in :meth:`hyper_step`.
    The optimiser's state is part of ``state_dict`` (``_extra_state``), so a checkpoint restores it.
    """

    learns_from_held_out = True

    def __init__(
        self,
        T: float = 4.0,
        T_min: float = 2.0,
        T_max: float = 6.0,
        meta_lr: float = 0.05,
        meta_optimizer: str = "adam",
    ):
        super().__init__()
        self.T_min, self.T_max = check_range(T_min, T_max)
        T = float(T)
        if not self.T_min < T < self.T_max:
            raise ValueError(
                f"the meta schedule needs T_min < T < T_max (T = T_min + (T_max − T_min)·sigmoid(ρ)); "
                f"got T={T}, T_min={self.T_min}, T_max={self.T_max}."
            )
        self.meta_lr = float(meta_lr)
        if not (self.meta_lr > 0 and math.isfinite(self.meta_lr)):
            raise ValueError(f"meta_lr must be a positive number, got {meta_lr}.")
        fraction = (T - self.T_min) / (self.T_max - self.T_min)
        self.rho = nn.Parameter(torch.tensor(math.log(fraction / (1.0 - fraction))))
        self.optimizer_class = META_OPTIMIZERS.get(meta_optimizer, "meta_optimizer")
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimiser of ``ρ``, made on first use (making one imports torch's compiler stack, about a second, which
        validating a config never needs)."""
        if self._optimizer is None:
            self._optimizer = self.optimizer_class([self.rho], lr=self.meta_lr)
        return self._optimizer

    @classmethod
    def initial_range(cls, **options: Any) -> tuple[float, float] | None:
        """Inside ``(T_min, T_max)``, which the sigmoid never reaches: 0.1 % of the range in from each end."""
        ends = bounds_option(cls, options)
        if ends is None:
            return None
        margin = 1e-3 * (ends[1] - ends[0])
        return ends[0] + margin, ends[1] - margin

    def current(self) -> Tensor:
        """``T_min + (T_max − T_min) · sigmoid(ρ)``; differentiable with respect to ``ρ``."""
        return self.T_min + (self.T_max - self.T_min) * torch.sigmoid(self.rho)

    def hyper_step(
        self, train_loss_fn: TrainLossFn, val_loss_fn: ValLossFn, params: dict[str, Tensor], inner_lr: float
    ) -> float:
        """One update of ``ρ``; returns the hypergradient ``g_T = d L_val(θ') / d T``.

        ``train_loss_fn(params, T)`` is the distillation loss with the student's parameters ``params`` at
        temperature ``T``; ``val_loss_fn(params)`` the held-out loss with ``params``. ``params`` (for instance
        ``dict(student.named_parameters())``) are not changed and get no ``.grad``; entries that do not require
        grad are held fixed in the look-ahead step.
        """
        with torch.enable_grad():
            temperature = self.current().detach().requires_grad_(True)
            names = [k for k, p in params.items() if p.requires_grad]
            train_loss = train_loss_fn(params, temperature)
            inputs = [params[k] for k in names]
            grads = torch.autograd.grad(train_loss, inputs, create_graph=True, allow_unused=True)
            stepped = dict(params)
            for name, grad in zip(names, grads):
                if grad is not None:
                    stepped[name] = params[name] - inner_lr * grad
            val_loss = val_loss_fn(stepped)
            (g_t,) = torch.autograd.grad(val_loss, temperature, allow_unused=True)
            if g_t is None:
                raise ValueError(
                    "the meta temperature cannot learn: the held-out loss after the look-ahead step does not depend "
                    "on T (the distillation loss has no temperature-dependent term with a gradient on the student). "
                    "Add a KD method that uses T (e.g. kd) or choose another temperature schedule."
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.current().backward(g_t)
            self.optimizer.step()
        return float(g_t)

    def get_extra_state(self) -> Any:
        """The optimiser's state, copied: ``Optimizer.state_dict`` returns its live moment tensors, which a module
        loaded from this state dict would otherwise share and update twice."""
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def set_extra_state(self, state: Any) -> None:
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
