"""The seam every KD method plugs into: :data:`LOSSES` and :class:`DistillLoss`.

A KD method is one small :class:`DistillLoss` registered by name. The distiller builds it with five *context*
keyword arguments it always supplies (``num_classes``, ``num_teachers``, ``num_train``, ``student_taps``,
``teacher_taps``) plus the method's own options from YAML, asks which features it needs
(:meth:`DistillLoss.student_tap_names`, :meth:`DistillLoss.teacher_tap_names`), calls :meth:`DistillLoss.setup`
once with a real first batch (adapters, memory banks), and then, every step, :meth:`forward` returns named
**unweighted** scalar terms that the distiller multiplies by the method's ``weight``.

Multi-teacher convention: logit methods go through :func:`hpmkd.losses.mixing.teacher_kl`; feature and relation
methods compute a per-teacher, per-sample loss ``ℓ[B, M]`` and reduce it with :func:`combine_teachers`.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from hpmkd.distill_batch import DistillBatch, ModelTaps
from hpmkd.registry import Registry

LOSSES: Registry["DistillLoss"] = Registry(
    "loss", context=("num_classes", "num_teachers", "num_train", "student_taps", "teacher_taps"))


class DistillLoss(nn.Module):
    """Base class of the KD methods (see the module docstring for the life cycle).

    Subclasses declare the five context arguments and their own options as explicit keyword arguments (so that
    :meth:`hpmkd.registry.Registry.check_options` can validate YAML) and implement ``forward(batch) -> dict``.
    ``uses_temperature`` says whether the method reads ``batch.temperature`` (the stage's schedule).
    """

    uses_temperature: ClassVar[bool] = False

    def __init__(
        self,
        *,
        num_classes: int,
        num_teachers: int,
        num_train: int,
        student_taps: ModelTaps,
        teacher_taps: list[ModelTaps],
    ):
        super().__init__()
        if len(teacher_taps) != num_teachers:
            raise ValueError(f"got {len(teacher_taps)} teacher tap descriptions for {num_teachers} teachers.")
        self.num_classes = num_classes
        self.num_teachers = num_teachers
        self.num_train = num_train
        self.student_taps = student_taps
        self.teacher_taps = list(teacher_taps)

    def student_tap_names(self) -> set[str]:
        """Names of the student modules whose outputs this method reads (none for logit methods)."""
        return set()

    def teacher_tap_names(self) -> list[set[str]]:
        """Per teacher, the module names whose outputs this method reads (empty sets for logit methods)."""
        return [set() for _ in range(self.num_teachers)]

    def setup(self, batch: DistillBatch) -> None:
        """Build shape-dependent parts from a real first batch; logit methods have none."""


def combine_teachers(per_teacher: Tensor, weights: Tensor) -> Tensor:
    """``L = (1/B) Σ_i Σ_m w_{i,m} ℓ_{i,m}``: per-sample, per-teacher losses ``[B, M]`` reduced with the
    aggregator's weights ``[B, M]`` (rows sum to 1). With one teacher this is the batch mean. hpmkd's multi-teacher
    convention for feature and relation methods."""
    if per_teacher.shape != weights.shape:
        raise ValueError(
            f"per-teacher losses {tuple(per_teacher.shape)} and teacher weights {tuple(weights.shape)} "
            f"must both be [B, M]."
        )
    return (per_teacher * weights).sum(1).mean()
