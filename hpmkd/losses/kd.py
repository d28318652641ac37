"""Hinton knowledge distillation (Hinton, Vinyals, Dean 2015), as RepDistiller ``distiller_zoo/KD.py``."""

from __future__ import annotations

from torch import Tensor

from hpmkd.distill_batch import DistillBatch
from hpmkd.losses.base import LOSSES, DistillLoss
from hpmkd.losses.mixing import teacher_kl


@LOSSES.register("kd")
class KD(DistillLoss):
    """``L_KD = (1/B) Σ_i c_i · T² · KL(σ(z_T,i / T) || σ(z_S,i / T))`` (KL summed over classes, mean over the batch).

    Source: Hinton et al. 2015; RepDistiller ``DistillKL`` (``kl_div(..., size_average=False) · T² / B``). Several
    teachers are combined by the aggregator's ``mix`` (:func:`hpmkd.losses.mixing.teacher_kl`). ``T`` is the stage's
    temperature schedule. ``c_i`` is the aggregator's per-sample confidence (:attr:`DistillBatch.confidence`): 1 for
    every aggregator but ``variance``, whose consensus confidence ``c_i = exp(−v_i / ν)`` makes this HumP-KD's
    uncertainty-aware term ``L_UKD`` (our reconstruction of HumP-KD, arXiv 2606.14684, abstract only). Term: ``kd``.
    """

    uses_temperature = True

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        per_sample = teacher_kl(
            batch.student_logits, batch.teachers.logits, batch.teacher_weights, batch.mix, batch.temperature
        )
        if batch.confidence is not None:
            per_sample = batch.confidence * per_sample
        return {"kd": per_sample.mean()}
