"""FitNets hints (Romero et al., ICLR 2015) in the single-stage form of RepDistiller / mdistiller."""

from __future__ import annotations

from typing import Any
import torch
from torch import Tensor, nn

from hpmkd.distill_batch import DistillBatch
from hpmkd.features import as_feature_map, make_adapter
from hpmkd.losses.base import LOSSES, DistillLoss, combine_teachers
from hpmkd.losses.layers import Layer, resolve_layer, student_feature, teacher_feature


def hint_view(feature: Tensor) -> Tensor:
    """Hidden vectors ``[B, D]`` as they are; maps and token sequences as ``[B, C, H, W]``."""
    return feature if feature.dim() == 2 else as_feature_map(feature)


def hint_target(teacher: Tensor, student: Tensor) -> Tensor:
    """The teacher's guided feature as the regressor's target: its map, or, when the student's hint is a vector
    ``[B, D]`` (an MLP student), the map averaged over space ``[B, C]`` (our choice, so MLP students can take hints
    from convolutional teachers)."""
    target = hint_view(teacher)
    return target.mean((2, 3)) if student.dim() == 2 and target.dim() == 4 else target


def hint_source(student: Tensor, teacher: Tensor) -> Tensor:
    """The student's hint as the regressor's input: its map, or, when the teacher's guided feature is a vector
    ``[B, D]`` (an MLP teacher), the map averaged over space ``[B, C]`` (our choice, so convolutional students can
    take hints from MLP teachers)."""
    source = hint_view(student)
    return source.mean((2, 3)) if source.dim() == 4 and teacher.dim() == 2 else source


@LOSSES.register("fitnet")
class FitNet(DistillLoss):
    """``ℓ_{i,m} = mean_{c,h,w} (r_m(F_S,i) − F_T^m,i)²``, ``L = (1/B) Σ_i Σ_m w_{i,m} ℓ_{i,m}``.

    ``r_m`` is RepDistiller's :class:`~hpmkd.features.ConvReg` (conv + BN + ReLU) from the student's hint layer to
    teacher ``m``'s guided layer, one per teacher (FitNet-MKD, the multi-teacher baseline in ``Rorozhl/CA-MKD``);
    for MLP hidden layers ``[B, D]`` ``r_m`` is a linear map to the teacher's spatially pooled feature instead (our
    choice, for MLP students, see :func:`hint_target`). With one teacher ``L`` is
    ``nn.MSELoss()`` as RepDistiller's ``HintLoss`` (run with weight 100). ``student_layer`` / ``teacher_layer``:
    a module name or an index into the feature taps; default the middle feature tap (RepDistiller's
    ``hint_layer = 2`` of its five features). Term: ``hint``.
    """

    def __init__(
        self,
        *,
        student_layer: Layer | None = None,
        teacher_layer: Layer | None = None,
        **context: Any,
    ):
        super().__init__(**context)
        self.student_layer = resolve_layer(self.student_taps, student_layer, "student_layer")
        self.teacher_layers = [resolve_layer(t, teacher_layer, "teacher_layer") for t in self.teacher_taps]
        self.regressors = nn.ModuleList()

    def student_tap_names(self) -> set[str]:
        return {self.student_layer}

    def teacher_tap_names(self) -> list[set[str]]:
        return [{name} for name in self.teacher_layers]

    def pair(self, batch: DistillBatch, m: int, name: str) -> tuple[Tensor, Tensor]:
        """(regressor input, target) for teacher ``m``: see :func:`hint_source` and :func:`hint_target`."""
        f_s, f_t = student_feature(batch, self.student_layer), teacher_feature(batch, m, name)
        source = hint_source(f_s, hint_view(f_t))
        return source, hint_target(f_t, source)

    def setup(self, batch: DistillBatch) -> None:
        pairs = [self.pair(batch, m, name) for m, name in enumerate(self.teacher_layers)]
        self.regressors = nn.ModuleList(make_adapter(s.shape, t.shape).to(s.device) for s, t in pairs)

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        per_teacher = []
        for m, (reg, name) in enumerate(zip(self.regressors, self.teacher_layers)):
            source, target = self.pair(batch, m, name)
            per_teacher.append((reg(source) - target).pow(2).flatten(1).mean(1))
        per_teacher = torch.stack(per_teacher, dim=1)
        return {"hint": combine_teachers(per_teacher, batch.teacher_weights)}
