"""Optimisers and learning-rate schedules as registries: ``train.optimizer`` and ``train.lr_schedule`` name entries.

An optimiser entry is ``factory(params, cfg: TrainConfig, **options) -> torch.optim.Optimizer`` (``options`` from
``train.optimizer_options``); a schedule entry is ``factory(cfg, total_steps, steps_per_epoch) -> shape`` where
``shape(p)`` multiplies the base learning rate at training progress ``p ∈ [0, 1]`` (after the linear warm-up of
``train.warmup_epochs``, which every schedule shares, :func:`lr_factor`; its options from
``train.lr_schedule_options``). A new optimiser or schedule is one registered entry: the Langevin samplers ``sgld``
and ``psgld`` and the ``cyclical`` step size are in :mod:`hpmkd.langevin`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from hpmkd.registry import Registry, user_options

if TYPE_CHECKING:
    from hpmkd.config import TrainConfig

Shape = Callable[[float], float]
Factor = Callable[[int], float]

OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer", context=("params", "cfg"))
LR_SCHEDULES: Registry[Shape] = Registry("lr schedule", context=("cfg", "total_steps", "steps_per_epoch"))


@OPTIMIZERS.register("sgd")
def sgd(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with ``train.momentum`` (heavy ball, or ``train.nesterov``) and L2 ``train.weight_decay``."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def adam(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2015) with L2 ``train.weight_decay``."""
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019): decoupled ``train.weight_decay``."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, data_size: int | None = None) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optimizer`` with ``cfg.optimizer_options``. An optimiser with a ``data_size`` option (the
    Langevin samplers' ``N``) that the options leave out gets ``data_size``, the training split's size."""
    options = dict(cfg.optimizer_options)
    accepted = user_options(OPTIMIZERS.get(cfg.optimizer, "train.optimizer"), OPTIMIZERS.context)
    if data_size is not None and accepted is not None and "data_size" in accepted:
        options.setdefault("data_size", data_size)
    return OPTIMIZERS.build(cfg.optimizer, options, "train.optimizer_options", params=params, cfg=cfg)


@LR_SCHEDULES.register("cosine")
def cosine(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> Shape:
    """``½ (1 + cos(π p))`` at training progress ``p ∈ [0, 1]`` (Loshchilov & Hutter 2017, without restarts)."""
    return lambda progress: 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@LR_SCHEDULES.register("step")
def step(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> Shape:
    """``γ^k`` after ``k`` of the ``train.lr_milestones`` (fractions of training) have passed."""
    return lambda progress: cfg.lr_gamma ** sum(progress >= m for m in cfg.lr_milestones)


@LR_SCHEDULES.register("constant")
def constant(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> Shape:
    return lambda progress: 1.0


def lr_factor(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> Factor:
    """Multiplier of the base learning rate at optimisation step ``s``: a linear warm-up over
    ``train.warmup_epochs``, then the schedule ``train.lr_schedule`` at progress ``(s − warm) / (total − warm)``."""
    warm = cfg.warmup_epochs * steps_per_epoch
    schedule = LR_SCHEDULES.build(cfg.lr_schedule, cfg.lr_schedule_options, "train.lr_schedule_options", cfg=cfg,
                                  total_steps=total_steps, steps_per_epoch=steps_per_epoch)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return schedule((s - warm) / max(1, total_steps - warm))

    return factor


from hpmkd import langevin  # noqa: E402,F401  (registers sgld, psgld and cyclical)
