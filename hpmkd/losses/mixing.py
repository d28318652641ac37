"""How a logit method sees several teachers: the three ``mix`` modes and :func:`teacher_kl`.

The aggregator (:mod:`hpmkd.ensemble`) gives per-sample weights ``w [B, M]`` (rows sum to 1) and a ``mix``:

* ``logits``: one target ``σ(Σ_m w_m z_m / T)``;
* ``probs``:  one target ``Σ_m w_m σ(z_m / T)``;
* ``loss``:   the method's per-sample loss is computed against every teacher and averaged, ``Σ_m w_m ℓ(σ(z_m / T))``
  (AVER / EBKD / CA-MKD style: CA-MKD, Zhang, Chen, Wang, ICASSP 2022, arXiv 2201.00007, and the multi-teacher
  baselines in its repository ``Rorozhl/CA-MKD``).

:func:`over_teachers` applies any per-sample function of a target *log*-distribution under these rules, so every
logit method (KD, DKD, the SMSKD reference weights) treats teachers the same way.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hpmkd.distill_batch import Mix
from hpmkd.registry import Registry

TargetFn = Callable[[Tensor], Tensor]
Temperature = Tensor | float


def kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q) = Σ_c p_c (log p_c − log q_c)`` over the last dimension, from log-probabilities
    (so ``p_c = 0`` contributes 0, never NaN)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def mix_logits(fn: TargetFn, teacher_logits: Tensor, weights: Tensor, T: Temperature) -> Tensor:
    """``fn(log σ(Σ_m w_m z_m / T))``."""
    return fn(F.log_softmax(torch.einsum("bm,mbc->bc", weights, teacher_logits) / T, dim=-1))


def mix_probs(fn: TargetFn, teacher_logits: Tensor, weights: Tensor, T: Temperature) -> Tensor:
    """``fn(log Σ_m w_m σ(z_m / T))``; the mixture is clamped at the smallest normal float before the log so that a
    class every teacher gives probability 0 stays finite (and contributes 0 to a KL)."""
    probs = torch.einsum("bm,mbc->bc", weights, F.softmax(teacher_logits / T, dim=-1))
    return fn(torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)))


def mix_loss(fn: TargetFn, teacher_logits: Tensor, weights: Tensor, T: Temperature) -> Tensor:
    """``Σ_m w_m fn(log σ(z_m / T))`` (``fn`` may return ``[B]`` or ``[B, ...]``)."""
    per_teacher = torch.stack([fn(F.log_softmax(z / T, dim=-1)) for z in teacher_logits])  # [M, B, ...]
    w = weights.t().reshape(*weights.t().shape, *([1] * (per_teacher.dim() - 2)))
    return (w * per_teacher).sum(0)


MIXES: Registry[Tensor] = Registry("teacher mix")
MIXES.register("logits")(mix_logits)
MIXES.register("probs")(mix_probs)
MIXES.register("loss")(mix_loss)


def over_teachers(fn: TargetFn, teacher_logits: Tensor, weights: Tensor, mix: Mix, T: Temperature) -> Tensor:
    """Apply ``fn`` (target log-distribution ``[B, C]`` -> per-sample values ``[B, ...]``) to the teachers
    ``[M, B, C]`` combined with ``weights [B, M]`` as ``mix`` says (module docstring)."""
    m, b, _ = teacher_logits.shape
    if tuple(weights.shape) != (b, m):
        raise ValueError(f"teacher weights must be [B, M] = [{b}, {m}]; got {tuple(weights.shape)}.")
    return MIXES.get(mix, "mix")(fn, teacher_logits, weights, T)


def teacher_kl(
    student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, mix: Mix, T: Temperature
) -> Tensor:
    """Per-sample ``T² · KL(target || σ(z_S / T))`` (KL summed over classes), ``[B]``, for the three mixes.

    With one teacher every mix is Hinton's soft-target term (Hinton et al. 2015; RepDistiller ``DistillKL``).
    ``T`` may be a 0-dim tensor that requires grad; the graph is kept.
    """
    log_q = F.log_softmax(student_logits / T, dim=-1)
    return T**2 * over_teachers(lambda log_p: kl_from_log_probs(log_p, log_q), teacher_logits, weights, mix, T)


def teacher_true_class_prob(teacher_logits: Tensor, weights: Tensor, mix: Mix, y: Tensor) -> Tensor:
    """``tcp_i = p_T(y_i | x_i)`` at ``T = 1`` of the mixed teacher distribution, ``[B]``, detached.

    ``logits``: ``σ(Σ_m w_m z_m)[y]``; ``probs`` and ``loss``: ``Σ_m w_m σ(z_m)[y]`` (for ``loss`` the teacher's
    distribution is taken to be the probability mixture: our choice).
    """
    mix = "probs" if mix == "loss" else mix
    with torch.no_grad():
        return over_teachers(lambda log_p: log_p.exp().gather(1, y[:, None])[:, 0], teacher_logits, weights, mix, 1.0)
