"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), as RepDistiller ``distiller_zoo/AT.py``."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hpmkd.distill_batch import DistillBatch
from hpmkd.features import as_feature_map
from hpmkd.losses.base import LOSSES, DistillLoss, combine_teachers
from hpmkd.losses.layers import Layer, layer_pairs, student_feature, teacher_feature


def attention_map(feature: Tensor, p: float) -> Tensor:
    """``a(F) = normalize_L2(mean_c F^p)`` flattened to ``[B, H·W]`` (RepDistiller ``Attention.at``)."""
    return F.normalize(feature.pow(p).mean(1).flatten(1), dim=1)


def at_per_sample(f_s: Tensor, f_t: Tensor, p: float) -> Tensor:
    """``mean_hw (a(F_S) − a(F_T))²`` per sample, ``[B]``, after adaptive average pooling of the larger map to the
    smaller one's size (per spatial dimension)."""
    size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
    f_s = F.adaptive_avg_pool2d(f_s, size) if tuple(f_s.shape[2:]) != size else f_s
    f_t = F.adaptive_avg_pool2d(f_t, size) if tuple(f_t.shape[2:]) != size else f_t
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean(1)


@LOSSES.register("at")
class AttentionTransfer(DistillLoss):
    """``L_AT = (1/B) Σ_i Σ_m w_{i,m} Σ_l mean_hw (a(F_S^l) − a(F_T^{m,l}))²_i``, ``a`` of :func:`attention_map`.

    Source: RepDistiller ``Attention`` (p = 2; the sum over layers of per-layer means; run with weight 1000).
    ``layers``: ``[[student_layer, teacher_layer], ...]`` (names or feature-tap indices); default the last
    ``min(#student, #teacher)`` feature taps paired in order (our choice; RepDistiller pairs ``feat[1:-1]``).
    Term: ``at``.
    """

    def __init__(
        self,
        *,
        p: float = 2.0,
        layers: Sequence[Sequence[Layer]] | None = None,
        **context: Any,
    ):
        super().__init__(**context)
        if p <= 0:
            raise ValueError(f"p must be > 0 (the paper uses 2); got {p}.")
        self.p = float(p)
        self.pairs = layer_pairs(self.student_taps, self.teacher_taps, layers, "layers")

    def student_tap_names(self) -> set[str]:
        return {s for s, _ in self.pairs}

    def teacher_tap_names(self) -> list[set[str]]:
        return [{ts[m] for _, ts in self.pairs} for m in range(self.num_teachers)]

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        per_teacher = torch.stack(
            [
                sum(
                    at_per_sample(
                        as_feature_map(student_feature(batch, s)),
                        as_feature_map(teacher_feature(batch, m, ts[m])),
                        self.p,
                    )
                    for s, ts in self.pairs
                )
                for m in range(self.num_teachers)
            ],
            dim=1,
        )
        return {"at": combine_teachers(per_teacher, batch.teacher_weights)}
