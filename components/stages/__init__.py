"""Stage kinds: what each node of a pipeline's graph does, each recorded as one nested MLflow run.

:mod:`~hpmkd.components.stages.base` holds the protocol (:class:`StageKind`, :data:`STAGE_KINDS`, :func:`execute`);
each other module registers kinds: :mod:`~hpmkd.components.stages.train` (``train_teacher``, ``train_student``,
``load_teacher``), :mod:`~hpmkd.components.stages.fit_teacher` (``fit_teacher``),
:mod:`~hpmkd.components.stages.distill` (``distill``, ``chain_link``),
:mod:`~hpmkd.components.stages.chain_plan` (``chain_plan``), :mod:`~hpmkd.components.stages.tune` (``tune``),
:mod:`~hpmkd.components.stages.meta_mlp` (``meta_mlp``, HumP-KD's Meta-MLP teacher),
:mod:`~hpmkd.components.stages.mtbkd` (``posterior_chain``, ``pool_predictors``).
"""

from hpmkd.components.stages import (chain_plan, distill, fit_teacher, meta_mlp, mtbkd,  # noqa: F401  (the kinds)
                                     train, tune)
from hpmkd.components.stages.base import STAGE_KINDS, ExperimentContext, StageKind, StageRun, execute

__all__ = ["STAGE_KINDS", "ExperimentContext", "StageKind", "StageRun", "execute"]
