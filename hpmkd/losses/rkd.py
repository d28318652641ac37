"""Relational knowledge distillation (Park et al., CVPR 2019), as mdistiller ``mdistiller/distillers/RKD.py``."""

from __future__ import annotations

from typing import Any
import torch
import torch.nn.functional as F
from torch import Tensor

from hpmkd.distill_batch import DistillBatch
from hpmkd.losses.base import LOSSES, DistillLoss, combine_teachers
from hpmkd.losses.layers import embedding, student_feature, teacher_feature


def pairwise_distances(e: Tensor, squared: bool, eps: float) -> Tensor:
    """``ψ_D(t_i, t_j) = ||t_i − t_j||`` (``[B, B]``, zero diagonal), clamped at ``eps`` before the square root."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)
    d = d if squared else d.sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def normalised_distances(e: Tensor, squared: bool, eps: float) -> Tensor:
    """Distances divided by their mean over the off-diagonal pairs (``μ`` of the paper)."""
    d = pairwise_distances(e, squared, eps)
    return d / d[d > 0].mean()


def angles(e: Tensor) -> Tensor:
    """``ψ_A(t_i, t_j, t_k) = <(t_j − t_i)/||·||, (t_k − t_i)/||·||>``, ``[B, B, B]`` (vertex ``i`` first)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return diff @ diff.transpose(1, 2)


def rkd_per_sample(f_s: Tensor, f_t: Tensor, squared: bool, eps: float) -> tuple[Tensor, Tensor]:
    """Per-anchor Huber (smooth-L1, β = 1) losses ``[B]`` for distances (row ``i``) and angles (vertex ``i``); their
    batch means are mdistiller's ``loss_d`` and ``loss_a``."""
    with torch.no_grad():
        t_d = normalised_distances(f_t, squared, eps)
        t_a = angles(f_t)
    d = F.smooth_l1_loss(normalised_distances(f_s, squared, eps), t_d, reduction="none").mean(1)
    a = F.smooth_l1_loss(angles(f_s), t_a, reduction="none").flatten(1).mean(1)
    return d, a


@LOSSES.register("rkd")
class RKD(DistillLoss):
    """``distance = w_D · (1/B²) Σ_{i,j} Huber(ψ_D(s_i, s_j), ψ_D(t_i, t_j))``,
    ``angle = w_A · (1/B³) Σ_{i,j,k} Huber(ψ_A(s_i, s_j, s_k), ψ_A(t_i, t_j, t_k))`` on the embedding taps
    (flattened; student and teacher widths may differ). Several teachers: per-anchor losses weighted by ``w_{i,m}``.

    Source: Park et al. 2019; mdistiller ``RKD.py`` (``distance_weight`` 25, ``angle_weight`` 50, ``squared`` False,
    ``eps`` 1e-12). Terms: ``distance``, ``angle`` (already multiplied by their weights).
    """

    def __init__(
        self,
        *,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        squared: bool = False,
        eps: float = 1e-12,
        **context: Any,
    ):
        super().__init__(**context)
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (it keeps the square root's gradient finite); got {eps}.")
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)
        self.squared = bool(squared)
        self.eps = float(eps)

    def student_tap_names(self) -> set[str]:
        return {self.student_taps.embedding_tap}

    def teacher_tap_names(self) -> list[set[str]]:
        return [{t.embedding_tap} for t in self.teacher_taps]

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        if batch.student_logits.shape[0] < 3:
            raise ValueError("RKD's angle term needs a batch of at least 3 samples; raise batch_size.")
        f_s = embedding(student_feature(batch, self.student_taps.embedding_tap))
        per = [
            rkd_per_sample(f_s, embedding(teacher_feature(batch, m, t.embedding_tap)), self.squared, self.eps)
            for m, t in enumerate(self.teacher_taps)
        ]
        distance = torch.stack([d for d, _ in per], dim=1)
        angle = torch.stack([a for _, a in per], dim=1)
        return {
            "distance": self.distance_weight * combine_teachers(distance, batch.teacher_weights),
            "angle": self.angle_weight * combine_teachers(angle, batch.teacher_weights),
        }
