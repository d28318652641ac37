"""The KD method library: every loss registers itself in :data:`LOSSES` by name.

* ``kd``: Hinton soft targets, ``T²·KL`` (:mod:`hpmkd.losses.kd`)
* ``dkd``: decoupled KD, TCKD + NCKD (:mod:`hpmkd.losses.dkd`)
* ``fitnet``: FitNets hint MSE through ConvReg (:mod:`hpmkd.losses.fitnet`)
* ``at``: attention transfer (:mod:`hpmkd.losses.at`)
* ``rkd``: relational KD, distance + angle (:mod:`hpmkd.losses.rkd`)
* ``pkt``: probabilistic knowledge transfer (:mod:`hpmkd.losses.pkt`)
* ``crd``: contrastive representation distillation (:mod:`hpmkd.losses.crd`)
* ``hierarchical``: HumP-KD masked multi-level feature alignment, [RECON] our reconstruction
  (:mod:`hpmkd.losses.hierarchical`)
* ``reference``: SMSKD reference anchor with TCP weights, [RECON] our reconstruction (:mod:`hpmkd.losses.reference`)
* ``mtbkd_prior``: MT-BKD's teacher-informed Dirichlet mixture prior with entropy weights (:mod:`hpmkd.losses.mtbkd`)

Multi-teacher rules: :mod:`hpmkd.losses.mixing` (logit methods) and :func:`hpmkd.losses.base.combine_teachers`
(feature and relation methods).
"""

from hpmkd.losses import at, crd, dkd, fitnet, hierarchical, kd, mtbkd, pkt, reference, rkd  # noqa: F401  (registers)
from hpmkd.losses.base import LOSSES, DistillLoss, combine_teachers
from hpmkd.losses.mixing import over_teachers, teacher_kl, teacher_true_class_prob

__all__ = ["LOSSES", "DistillLoss", "combine_teachers", "over_teachers", "teacher_kl", "teacher_true_class_prob"]
