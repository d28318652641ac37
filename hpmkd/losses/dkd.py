"""Decoupled knowledge distillation (Zhao et al., CVPR 2022), as mdistiller ``mdistiller/distillers/DKD.py``."""

from __future__ import annotations

from typing import Any
import torch
import torch.nn.functional as F
from torch import Tensor

from hpmkd.distill_batch import DistillBatch
from hpmkd.losses.base import LOSSES, DistillLoss
from hpmkd.losses.mixing import Temperature, kl_from_log_probs, over_teachers


def binary_log_probs(log_p: Tensor, gt_mask: Tensor) -> Tensor:
    """``log b = [log p_t, log(1 − p_t)]``, ``[B, 2]``, from log-probabilities over all classes."""
    target = log_p.masked_fill(~gt_mask, float("-inf")).logsumexp(-1)
    others = log_p.masked_fill(gt_mask, float("-inf")).logsumexp(-1)
    return torch.stack([target, others], dim=-1)


def non_target_log_probs(log_p: Tensor, gt_mask: Tensor) -> Tensor:
    """``log p̂``: the distribution over the non-target classes, with mdistiller's ``− 1000 · gt_mask`` trick."""
    return F.log_softmax(log_p - 1000.0 * gt_mask.to(log_p.dtype), dim=-1)


def dkd_terms(student_logits: Tensor, teacher_log_probs: Tensor, y: Tensor, T: Temperature) -> Tensor:
    """Per-sample ``[KL(b^T || b^S), KL(p̂^T || p̂^S)]``, ``[B, 2]``, before ``T²`` (the decoupling identity
    ``KL(p^T || p^S) = TCKD + (1 − p_t^T) · NCKD`` holds per sample).
    ``teacher_log_probs`` is ``log σ(z_T / T)``."""
    gt_mask = F.one_hot(y, student_logits.shape[-1]).bool()
    log_q = F.log_softmax(student_logits / T, dim=-1)
    tckd = kl_from_log_probs(binary_log_probs(teacher_log_probs, gt_mask), binary_log_probs(log_q, gt_mask))
    nckd = kl_from_log_probs(non_target_log_probs(teacher_log_probs, gt_mask), non_target_log_probs(log_q, gt_mask))
    return torch.stack([tckd, nckd], dim=-1)


@LOSSES.register("dkd")
class DKD(DistillLoss):
    """``L = min((epoch + 1) / warmup, 1) · (α · TCKD + β · NCKD)`` with
    ``TCKD = (1/B) Σ_i T² · KL(b^T_i || b^S_i)``, ``b = [p_t, 1 − p_t]``, and
    ``NCKD = (1/B) Σ_i T² · KL(p̂^T_i || p̂^S_i)``, ``p̂`` the softmax over non-target classes
    (logits − 1000 · gt).

    Source: Zhao et al. 2022; mdistiller ``DKD.py`` and ``cfg.py`` (α = 1, β = 8, warm-up 20 epochs, T = 4 from the
    schedule). ``batch.epoch`` counts from 0 while mdistiller's counts from 1, hence ``epoch + 1``. Several teachers:
    the decomposition is applied to the mixed target (``logits``/``probs``) or per teacher (``loss``), see
    :func:`hpmkd.losses.mixing.over_teachers`. Terms: ``tckd`` = ramp·α·TCKD, ``nckd`` = ramp·β·NCKD.
    """

    uses_temperature = True

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        warmup: int = 20,
        **context: Any,
    ):
        super().__init__(**context)
        if warmup < 1:
            raise ValueError(f"warmup is a number of epochs >= 1; got {warmup} (use 1 for no warm-up).")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.warmup = int(warmup)

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        T = batch.temperature
        terms = over_teachers(
            lambda log_p: dkd_terms(batch.student_logits, log_p, batch.y, T),
            batch.teachers.logits,
            batch.teacher_weights,
            batch.mix,
            T,
        )
        scale = T**2 * min((batch.epoch + 1) / self.warmup, 1.0)
        tckd, nckd = (scale * terms).mean(0)
        return {"tckd": self.alpha * tckd, "nckd": self.beta * nckd}
