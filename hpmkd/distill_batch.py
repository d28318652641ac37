"""What one distillation step hands to every KD method, aggregator and temperature schedule.

These are the seams of the method library (see ``docs/methods.md``):

* a **KD method** (:class:`hpmkd.losses.base.DistillLoss`) reads a :class:`DistillBatch` and returns named loss
  terms (unweighted; the stage multiplies them by the method's ``weight``);
* a **multi-teacher aggregator** (:mod:`hpmkd.ensemble`) turns the teachers' logits into per-sample weights
  ``[B, M]`` and says how the teachers are combined (``mix``);
* a **temperature schedule** (:mod:`hpmkd.temperature`) gives the temperature ``T`` of this step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

#: How teachers are combined with the aggregator's weights ``w`` [B, M]:
#: ``logits``: target ``σ(Σ_m w_m z_m / T)``; ``probs``: target ``Σ_m w_m σ(z_m / T)``;
#: ``loss``: the loss is ``Σ_m w_m ℓ(teacher m)`` (AVER, EBKD, CA-MKD style).
Mix = Literal["logits", "probs", "loss"]


@dataclass
class TeacherOutputs:
    """Frozen teachers' outputs for one batch.

    ``logits``: ``[M, B, C]`` float32. ``features``: one dict per teacher, tap name -> tensor (``[B, ...]``);
    empty dicts when no method asked for teacher features.
    """

    logits: Tensor
    features: list[dict[str, Tensor]] = field(default_factory=list)

    @property
    def num_teachers(self) -> int:
        return int(self.logits.shape[0])

    def to(self, device: torch.device | str) -> "TeacherOutputs":
        return TeacherOutputs(
            self.logits.to(device, non_blocking=True),
            [{k: v.to(device, non_blocking=True) for k, v in f.items()} for f in self.features],
        )


@dataclass
class DistillBatch:
    """Everything a KD method may read for one training batch.

    ``index`` is each sample's position in the training split (CRD's memory bank uses it).
    ``teacher_weights`` ``[B, M]`` rows sum to 1 (uniform when there is a single teacher).
    ``temperature`` is a 0-dim tensor; it requires grad when a meta-learned schedule is being differentiated.
    ``reference_logits`` are the frozen previous-stage student's logits (SMSKD), ``None`` otherwise.
    ``confidence`` ``[B]`` in ``(0, 1]``: the aggregator's per-sample confidence in its target (the ``variance``
    aggregator's consensus confidence), which scales the ``kd`` term; ``None`` (every other aggregator) means 1.
    """

    x: Tensor
    y: Tensor
    index: Tensor
    student_logits: Tensor
    student_features: dict[str, Tensor]
    teachers: TeacherOutputs
    teacher_weights: Tensor
    mix: Mix
    temperature: Tensor
    epoch: int = 0
    total_epochs: int = 1
    reference_logits: Tensor | None = None
    confidence: Tensor | None = None


@dataclass(frozen=True)
class ModelTaps:
    """Where a model's features are, by module name (as in ``model.named_modules()``).

    ``feature_taps``: modules whose outputs are the stage feature maps ``[B, C, H, W]``, shallow to deep (hidden
    layers ``[B, D]`` for MLPs). ``embedding_tap``: the module giving the penultimate pooled feature (consumers
    call ``.flatten(1)``). ``classifier_tap``: the final linear layer.
    """

    feature_taps: tuple[str, ...]
    embedding_tap: str
    classifier_tap: str
