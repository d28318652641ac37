"""What one search trial trains: a distillation stage's spec with a configuration applied, at the trial's fidelity.

The configuration manager's trials (``components/stages/tune.py``) must rank configurations the way the full
distillation would (docs/config_manager.md). A trial keeps the stage's whole schedule (``budget_epochs`` null: its
epochs, warm-up and learning-rate decay exactly as the full run has them) and trains on a stratified
``trial_fraction`` of the training split instead, fixed by the seed (:func:`hpmkd.data.splits.trial_rows`); a
number of ``budget_epochs`` compresses the schedule to that many epochs instead (the fidelity of hpmkd before; short
schedules favour large learning rates and no weight decay, Wu et al. 2018, "Understanding Short-Horizon Bias in
Stochastic Meta-Optimization", arXiv 1803.02021). Validation scores every trial; the test split is never read.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hpmkd.config import Recipe
from hpmkd.training import StageSpec


def trial_spec(spec: StageSpec, recipe: Recipe, overrides: dict[str, Any], epochs: int, fraction: float) -> StageSpec:
    """``spec`` (a distillation stage's) with ``recipe`` and the config key paths ``overrides`` applied, trained for
    ``epochs`` epochs on ``fraction`` of the training split, never reading the test split."""
    tuned = recipe.with_overrides(overrides)
    return replace(spec, distill=tuned.distill, train=replace(tuned.train, epochs=epochs), read_test=False,
                   train_fraction=fraction)
