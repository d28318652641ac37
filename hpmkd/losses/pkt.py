"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as RepDistiller ``distiller_zoo/PKT.py``."""

from __future__ import annotations

from typing import Any
import torch
from torch import Tensor

from hpmkd.distill_batch import DistillBatch
from hpmkd.losses.base import LOSSES, DistillLoss, combine_teachers
from hpmkd.losses.layers import embedding, student_feature, teacher_feature


def conditional_probabilities(f: Tensor, eps: float) -> Tensor:
    """``p_{j|i} = K(i, j) / Σ_j K(i, j)`` with the cosine kernel ``K = (cos(f_i, f_j) + 1) / 2``, ``[B, B]``."""
    f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)
    k = (f @ f.t() + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


def pkt_per_sample(f_s: Tensor, f_t: Tensor, eps: float) -> Tensor:
    """``ℓ_i = (1/B) Σ_j p^T_{j|i} log((p^T_{j|i} + ε) / (p^S_{j|i} + ε))``, ``[B]``; the batch mean is
    RepDistiller's ``torch.mean`` over the ``B × B`` matrix."""
    p_t = conditional_probabilities(f_t, eps)
    p_s = conditional_probabilities(f_s, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean(1)


@LOSSES.register("pkt")
class PKT(DistillLoss):
    """``L_PKT = (1/B²) Σ_{i,j} p^T_{j|i} log((p^T_{j|i} + ε) / (p^S_{j|i} + ε))`` (:func:`pkt_per_sample`) on the
    embedding taps; student and teacher widths may differ. Several teachers: per-anchor losses weighted by ``w_{i,m}``.

    Source: Passalis & Tefas 2018; RepDistiller ``PKT.cosine_similarity_loss`` (ε = 1e-7, run with weight 30000).
    Term: ``pkt``.
    """

    def __init__(
        self,
        *,
        eps: float = 1e-7,
        **context: Any,
    ):
        super().__init__(**context)
        self.eps = float(eps)

    def student_tap_names(self) -> set[str]:
        return {self.student_taps.embedding_tap}

    def teacher_tap_names(self) -> list[set[str]]:
        return [{t.embedding_tap} for t in self.teacher_taps]

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        f_s = embedding(student_feature(batch, self.student_taps.embedding_tap))
        per_teacher = torch.stack(
            [
                pkt_per_sample(f_s, embedding(teacher_feature(batch, m, t.embedding_tap)), self.eps)
                for m, t in enumerate(self.teacher_taps)
            ],
            dim=1,
        )
        return {"pkt": combine_teachers(per_teacher, batch.teacher_weights)}
