"""Langevin samplers as optimisers (``train.optimizer: sgld | psgld``) and the cyclical step size
(``train.lr_schedule: cyclical``): entries of :data:`hpmkd.optim.OPTIMIZERS` and :data:`hpmkd.optim.LR_SCHEDULES`.

With ``L`` the mini-batch mean of the per-sample loss (the negative log-likelihood plus, per sample, the negative
log-prior) and ``N`` the training-set size, the posterior sampled is ``p(θ | D) ∝ exp(−N · L(θ))``.

* **SGLD** (Welling & Teh 2011), exactly as MT-BKD's reference code (``AnonymousSub1/MTBKD``,
  ``ESM_8M_distill_LMC_mix_weighted.py``): ``θ ← θ − ε₁ · N · ∇L + ε₂ · ξ``, ``ξ ~ N(0, I)``; ``ε₁`` is the
  learning rate (the reference: 8e-8) and ``ε₂`` the ``noise`` option (the reference: 4e-4, which is ``√(2 ε₁)``,
  the Langevin scale; ``noise: null`` uses ``√(2 ε₁)`` at every step).
* **pSGLD** (Li, Chen, Carlson, Carin 2016, "Preconditioned Stochastic Gradient Langevin Dynamics for Deep Neural
  Networks", AAAI, Algorithm 1) in the same convention: ``V ← α V + (1 − α) ∇L ⊙ ∇L``, ``G = 1 / (λ + √V)``,
  ``θ ← θ − ε₁ · G ⊙ (N · ∇L) + ε₂ · √G ⊙ ξ`` (the curvature-correction term Γ is dropped, as the paper does in
  practice).

When a step-size schedule changes ``ε₁`` during sampling, an explicit ``ε₂`` follows it as ``ε₂ · √(ε₁(t) / ε₁(0))``
(the Langevin ratio); with the constant schedule it is the reference's fixed ``ε₂``. The noise is drawn from
PyTorch's global generator, which every Ray Train rank seeds alike and each checkpoint saves, so data-parallel
ranks draw the same noise and a resumed stage draws what an uninterrupted one would.

* **cyclical** step size (Zhang, Li, Zhang, Chen, Wilson 2020, "Cyclical Stochastic Gradient MCMC for Bayesian
  Deep Learning", ICLR, eq. 1): ``ε₁(p) = ε₁(0)/2 · (cos(π · frac(p · cycles)) + 1)`` at progress ``p ∈ [0, 1]``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

import torch
from torch import Tensor

from hpmkd.optim import LR_SCHEDULES, OPTIMIZERS, Shape

if TYPE_CHECKING:
    from hpmkd.config import TrainConfig


class LangevinOptimizer(torch.optim.Optimizer):
    """Shared by :class:`SGLD` and :class:`PreconditionedSGLD`: the options, the noise scale at a step and the loop
    over the parameters that have a gradient; a subclass's :meth:`update` moves one."""

    def __init__(self, params: Iterable[Tensor], lr: float, data_size: int, noise: float | None, **extra: float):
        if not lr > 0:
            raise ValueError(f"the step size (lr) must be > 0, got {lr}.")
        if data_size is None or int(data_size) < 1:
            raise ValueError(f"data_size (N, the training-set size) must be >= 1, got {data_size}.")
        if noise is not None and not noise >= 0:
            raise ValueError(f"noise (ε₂) must be >= 0 or null (√(2 ε₁)), got {noise}.")
        super().__init__(params, dict(lr=lr, data_size=int(data_size), noise=noise, **extra))

    @staticmethod
    def noise_scale(group: dict) -> float:
        """``ε₂`` at this step (module docstring)."""
        if group["noise"] is None:
            return math.sqrt(2.0 * group["lr"])
        return group["noise"] * math.sqrt(group["lr"] / group.get("initial_lr", group["lr"]))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            scale = self.noise_scale(group)
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group, scale)

    def update(self, p: Tensor, group: dict, scale: float) -> None:
        """Move ``p`` one step, ``scale`` being this step's ``ε₂``."""
        raise NotImplementedError


class SGLD(LangevinOptimizer):
    """``θ ← θ − ε₁ · N · ∇L + ε₂ · ξ`` (module docstring)."""

    def __init__(self, params: Iterable[Tensor], lr: float, data_size: int, noise: float | None = None):
        super().__init__(params, lr, data_size, noise)

    def update(self, p: Tensor, group: dict, scale: float) -> None:
        p.add_(p.grad, alpha=-group["lr"] * group["data_size"])
        p.add_(torch.randn_like(p), alpha=scale)


class PreconditionedSGLD(LangevinOptimizer):
    """pSGLD with an RMSprop preconditioner ``G = 1 / (λ + √V)`` (module docstring); ``alpha`` is ``α``, ``eps``
    is ``λ``."""

    def __init__(self, params: Iterable[Tensor], lr: float, data_size: int, noise: float | None = None,
                 alpha: float = 0.99, eps: float = 1e-5):
        if not 0 <= alpha < 1 or not eps > 0:
            raise ValueError(f"alpha must be in [0, 1) and eps > 0, got alpha={alpha}, eps={eps}.")
        super().__init__(params, lr, data_size, noise, alpha=alpha, eps=eps)

    def update(self, p: Tensor, group: dict, scale: float) -> None:
        state = self.state[p]
        if "square_avg" not in state:
            state["square_avg"] = torch.zeros_like(p)
        v = state["square_avg"]
        v.mul_(group["alpha"]).addcmul_(p.grad, p.grad, value=1 - group["alpha"])
        g = 1.0 / (group["eps"] + v.sqrt())
        p.addcmul_(g, p.grad, value=-group["lr"] * group["data_size"])
        p.addcmul_(g.sqrt(), torch.randn_like(p), value=scale)


@OPTIMIZERS.register("sgld")
def sgld(params: list[Tensor], cfg: TrainConfig, data_size: int | None = None,
         noise: float | None = None) -> torch.optim.Optimizer:
    """SGLD at step size ``train.lr`` (``ε₁``); ``data_size``: ``N`` (default: the training split's size);
    ``noise``: ``ε₂`` (default ``√(2 ε₁)``)."""
    return SGLD(params, lr=cfg.lr, data_size=data_size, noise=noise)


@OPTIMIZERS.register("psgld")
def psgld(params: list[Tensor], cfg: TrainConfig, data_size: int | None = None, noise: float | None = None,
          alpha: float = 0.99, eps: float = 1e-5) -> torch.optim.Optimizer:
    """pSGLD at step size ``train.lr``; ``alpha``: the preconditioner's decay, ``eps``: its ``λ``."""
    return PreconditionedSGLD(params, lr=cfg.lr, data_size=data_size, noise=noise, alpha=alpha, eps=eps)


@LR_SCHEDULES.register("cyclical")
def cyclical(cfg: TrainConfig, total_steps: int, steps_per_epoch: int, cycles: int = 4) -> Shape:
    """``½ (cos(π · frac(p · cycles)) + 1)``: ``cycles`` cosine cycles over training, each restarting at the full
    step size (Zhang et al. 2020)."""
    if int(cycles) < 1:
        raise ValueError(f"cycles must be >= 1, got {cycles}.")
    return lambda progress: 0.5 * (math.cos(math.pi * ((progress * cycles) % 1.0)) + 1.0)
