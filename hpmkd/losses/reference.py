"""SMSKD's reference anchor: keep the student close to the frozen previous-stage student, weighted per sample by the
teacher's true-class probability.

[RECON] (our reconstruction) SMSKD (Tian, Huang, Tang, Yao, arXiv 2601.15657) publishes only its abstract: "a
frozen reference model from the previous stage anchors learned knowledge" and "an adaptive weighting mechanism based
on the teacher true class probability (TCP)"; no official code was found. The loss form, the direction of the
weight and its normalisation are our reconstruction and are options.
"""

from __future__ import annotations

from typing import Any
import torch
import torch.nn.functional as F
from torch import Tensor

from hpmkd.distill_batch import DistillBatch
from hpmkd.losses.base import LOSSES, DistillLoss
from hpmkd.losses.mixing import kl_from_log_probs, teacher_true_class_prob
from hpmkd.registry import Registry

#: per-sample reference weight ``w_i`` from the teacher's true-class probability ``tcp_i``
REFERENCE_WEIGHTS: Registry[Tensor] = Registry("reference weighting")


@REFERENCE_WEIGHTS.register("one_minus_tcp")
def one_minus_tcp(tcp: Tensor) -> Tensor:
    """``w_i = 1 − tcp_i``: more anchoring where the teacher is unsure (SMSKD secondary note; our default)."""
    return 1.0 - tcp


@REFERENCE_WEIGHTS.register("tcp")
def tcp_weight(tcp: Tensor) -> Tensor:
    """``w_i = tcp_i``: more anchoring where the teacher is confident (the opposite reading)."""
    return tcp


@REFERENCE_WEIGHTS.register("uniform")
def uniform_weight(tcp: Tensor) -> Tensor:
    """``w_i = 1``: the TCP ablation."""
    return torch.ones_like(tcp)


def reference_per_sample(student_logits: Tensor, reference_logits: Tensor, tau: float) -> Tensor:
    """``ℓ_ref,i = τ² · KL(σ(z_R,i / τ) || σ(z_S,i / τ))``, ``[B]``."""
    log_r = F.log_softmax(reference_logits.detach() / tau, dim=-1)
    return tau**2 * kl_from_log_probs(log_r, F.log_softmax(student_logits / tau, dim=-1))


@LOSSES.register("reference")
class Reference(DistillLoss):
    """[RECON] ``L_ref = (1/B) Σ_i w_i · τ² · KL(σ(z_R,i/τ) || σ(z_S,i/τ))``, ``w_i = g(tcp_i)``.

    * ``tcp_i = σ(z_T(x_i))[y_i]`` at ``T = 1`` of the teachers mixed as the aggregator says
      (:func:`hpmkd.losses.mixing.teacher_true_class_prob`), detached.
    * ``mode``: ``one_minus_tcp`` (default: samples the teacher is unsure of keep more of the old knowledge, as the
      secondary note on SMSKD describes), ``tcp`` or ``uniform``.
    * ``normalize``: divide ``w`` by its batch mean so the term keeps a fixed scale (our choice, off by default).
    * ``tau_ref``: the anchor's own temperature (4, our suggested start), independent of the stage's schedule.
    Needs ``batch.reference_logits`` (the frozen previous-stage student, SMSKD stage ≥ 2). Term: ``reference``.
    """

    def __init__(
        self,
        *,
        mode: str = "one_minus_tcp",
        normalize: bool = False,
        tau_ref: float = 4.0,
        **context: Any,
    ):
        super().__init__(**context)
        if tau_ref <= 0:
            raise ValueError(f"tau_ref must be > 0; got {tau_ref}.")
        self.weighting = REFERENCE_WEIGHTS.get(mode, "mode")
        self.mode = mode
        self.normalize = bool(normalize)
        self.tau_ref = float(tau_ref)

    def sample_weights(self, batch: DistillBatch) -> Tensor:
        """``w_i`` (``[B]``), batch-mean normalised when ``normalize`` is on."""
        tcp = teacher_true_class_prob(batch.teachers.logits, batch.teacher_weights.detach(), batch.mix, batch.y)
        w = self.weighting(tcp)
        return w / w.mean().clamp_min(torch.finfo(w.dtype).eps) if self.normalize else w

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        if batch.reference_logits is None:
            raise ValueError(
                "method 'reference' needs a frozen previous-stage student, but this stage has none "
                "(batch.reference_logits is None). Use it only in SMSKD stages after the first."
            )
        per_sample = reference_per_sample(batch.student_logits, batch.reference_logits, self.tau_ref)
        return {"reference": (self.sample_weights(batch) * per_sample).mean()}
