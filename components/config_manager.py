"""The adaptive configuration manager's first step: what to try first for a new distillation task.

It reads the optimisation memory (:func:`hpmkd.components.memory.recall`: every finished distillation in the MLflow store,
or in ``config_manager.memory_experiments``) unless ``config_manager.memory`` is off, and asks
:func:`hpmkd.proposals.propose` for ``config_manager.proposals`` starting configurations (published defaults with no
usable history, nearest neighbours while it is small, a regressor once it is large), plus a value for each
hyperparameter that is proposed but not searched (:func:`hpmkd.search_space.proposed_only`).
"""

from __future__ import annotations

from mlflow import MlflowClient

from hpmkd.components.memory import recall
from hpmkd.config import ExperimentConfig
from hpmkd.meta_features import TaskFeatures
from hpmkd.proposals import MemoryRecord, Proposal, ProposerSettings, propose, propose_value
from hpmkd.search_space import SearchSpace, proposed_only


def budget_epochs(cfg: ExperimentConfig) -> int:
    """Epochs per trial: ``config_manager.budget_epochs``, or the distillation stage's epochs."""
    return cfg.config_manager.budget_epochs or cfg.recipe().train.epochs


def memory_records(cfg: ExperimentConfig, client: MlflowClient) -> list[MemoryRecord]:
    cm = cfg.config_manager
    return recall(client, cm.memory_experiments) if cm.memory else []


def settings_for(cfg: ExperimentConfig) -> ProposerSettings:
    cm = cfg.config_manager
    return ProposerSettings(cm.proposals, cm.neighbours, cm.regressor_min_records, cm.regressor_min_tasks,
                            budget_epochs(cfg), cm.trial_fraction, cfg.seed)


def proposals_for(cfg: ExperimentConfig, task: TaskFeatures, space: SearchSpace,
                  records: list[MemoryRecord]) -> list[Proposal]:
    """The starting configurations of the search (Tune's ``points_to_evaluate``)."""
    return propose(task, records, space, settings_for(cfg))


def fixed_for(cfg: ExperimentConfig, task: TaskFeatures, records: list[MemoryRecord]) -> list[Proposal]:
    """One proposal per hyperparameter that matters to ``cfg`` but is not searched (``chain_threshold``)."""
    return [propose_value(hp.name, hp.published(cfg), task, records, settings_for(cfg)) for hp in proposed_only(cfg)]


def source_of(proposals: list[Proposal]) -> str:
    """Where the proposals came from (``defaults``, ``memory:knn``, ``memory:regressor``), or ``none``."""
    return proposals[0].source if proposals else "none"
