"""MT-BKD's teacher-informed mixture prior (Fang, Chen, Cai, Ma, Zhong, "Multi-Teacher Knowledge Distillation via
Teacher-Informed Mixture Priors", arXiv 2605.27967; reference code ``AnonymousSub1/MTBKD``,
``loss_fn_kd_mix_weighted``). With one teacher it is the Dirichlet prior of single-teacher BKD (Fang, Chen, Zhong,
Ma, "Bayesian Knowledge Distillation", ICML 2024)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from hpmkd.distill_batch import DistillBatch
from hpmkd.ensemble import entropy_weights
from hpmkd.losses.base import LOSSES, DistillLoss


def log_beta(a: Tensor) -> Tensor:
    """``log B(a) = Σ_c log Γ(a_c) − log Γ(Σ_c a_c)`` over the last dimension."""
    return torch.lgamma(a).sum(-1) - torch.lgamma(a.sum(-1))


def dirichlet_log_density(log_p: Tensor, concentration: Tensor) -> Tensor:
    """``log Dir(p; a) = Σ_c (a_c − 1) log p_c − log B(a)``, from ``log p`` (no exponentiation)."""
    return ((concentration - 1.0) * log_p).sum(-1) - log_beta(concentration)


def mixture_prior_log_density(student_logits: Tensor, teacher_logits: Tensor, log_weights: Tensor,
                              lam: float, T: float) -> Tensor:
    """``log π_i = logsumexp_m (log w_im + log Dir(σ(z_S,i / T); 1 + λ σ(z_m,i / T)))``, ``[B]``.

    ``teacher_logits`` ``[M, B, C]``, ``log_weights`` ``[B, M]`` (rows of ``w`` sum to 1). The Dirichlet
    log-densities are combined in log space, so a large ``λ`` (very negative log-densities) stays finite where the
    reference code's ``Σ_m w_m exp(log Dir_m)`` underflows to ``log 0``."""
    log_p = F.log_softmax(student_logits / T, dim=-1)  # [B, C]
    concentration = 1.0 + lam * F.softmax(teacher_logits / T, dim=-1)  # [M, B, C]
    log_dir = dirichlet_log_density(log_p.unsqueeze(0), concentration)  # [M, B]
    return torch.logsumexp(log_weights.t() + log_dir, dim=0)


@LOSSES.register("mtbkd_prior")
class TeacherMixturePrior(DistillLoss):
    """The negative log of MT-BKD's teacher-informed mixture prior on the student's prediction::

        q_m = σ(z_m),  H_m = −Σ_c q_m,c log q_m,c          (T = 1; the log base cancels)
        w_m ∝ 1 − H_m / Σ_j H_j                            (per sample, detached; 1 for one teacher)
        a_m = 1 + λ · σ(z_m / T)
        log Dir_m = Σ_c (a_m,c − 1) log σ(z_S / T)_c − log B(a_m)
        log π = logsumexp_m (log w_m + log Dir_m)
        L_prior = −(1/B) Σ_i log π_i

    The reference objective is ``CE(z_S, y) + α (−c log π + 1)`` with ``α = 10``, ``c = 0.002``: here ``ce_weight:
    1`` and this method's ``weight: 0.02`` (``α·c``); the constant ``α`` is dropped (it moves no gradient).
    Options: ``lam`` (λ, the reference's ``lambda_const`` 5), ``T`` (the prior's own temperature, 2; not the
    stage's schedule), ``weights``: ``entropy`` (the reference's entropy weights, above) or ``aggregator`` (the
    stage aggregator's per-sample weights). Term: ``prior``.
    """

    def __init__(self, *, lam: float = 5.0, T: float = 2.0, weights: Literal["entropy", "aggregator"] = "entropy",
                 **context):
        super().__init__(**context)
        if not lam > 0 or not T > 0:
            raise ValueError(f"lam and T must be > 0, got lam={lam}, T={T}.")
        if weights not in ("entropy", "aggregator"):
            raise ValueError(f"weights must be 'entropy' or 'aggregator', got {weights!r}.")
        self.lam, self.T, self.weights = float(lam), float(T), weights

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        teacher_logits = batch.teachers.logits
        weights = entropy_weights(teacher_logits) if self.weights == "entropy" else batch.teacher_weights.detach()
        log_pi = mixture_prior_log_density(batch.student_logits, teacher_logits, weights.log(), self.lam, self.T)
        return {"prior": -log_pi.mean()}
