"""``mtbkd``: Bayesian multi-teacher distillation (MT-BKD, Fang, Chen, Cai, Ma, Zhong, "Multi-Teacher Knowledge
Distillation via Teacher-Informed Mixture Priors", arXiv 2605.27967; reference code ``AnonymousSub1/MTBKD``): the
student's posterior under the teachers' mixture prior, sampled by Langevin dynamics, as its predictor; and the
``mtbkd`` config section.

Graph (``mtbkd.chains: K``)::

    teacher_<a> ─┬─> mtbkd_chain_1 ─┐
    teacher_<b> ─┼─> …              ├─> mtbkd          (pool_predictors: the K chains' samples, pooled)
                 └─> mtbkd_chain_K ─┘
    student_alone                                      (with distill.baseline)
    ensemble_2 … ensemble_D ─> deep_ensemble           (with mtbkd.deep_ensemble: D; student_alone is member 1)

With one chain the chain stage is itself ``mtbkd``; with ``sample_epochs: 0`` ``mtbkd`` is a plain ``distill`` stage
(the posterior mode only, its best validation epoch selected). Each chain (``posterior_chain``) distils with the
``distill`` recipe (for MT-BKD: ``ce_weight: 1`` and ``methods: {mtbkd_prior: {weight: 0.02}}``) for its
``train.epochs`` (the posterior mode), then samples for ``mtbkd.sample_epochs`` with the ``mtbkd.sampler``
settings (:mod:`hpmkd.posterior`); chain ``k ≥ 1`` starts from its own initialisation and noise (``init_seed =
seed + 1000·k``) on the same data split. Chains run side by side on Ray; the pool stage pools their samples (equal
weights) and logs the split R-hat of the samples' validation log-likelihood across chains (``val_loglik_rhat``).
The runner checks before any stage starts that the sampling phase is long enough for ``burn_in + thin · samples``
steps (:meth:`MtbkdConfig.check_data`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from hpmkd.components.graph import Stage, StageParams
from hpmkd.components.stage_params import Distill, TrainModel
from hpmkd.config import SECTIONS, ExperimentConfig, Recipe, TrainConfig, check_train, merged_train
from hpmkd.config_schema import join, to_dict
from hpmkd.models.ref import ModelRef
from hpmkd.pipelines.registry import PIPELINES, baseline_stages, distill_stage, teacher_stages, worker_cpus
from hpmkd.posterior import PosteriorSampling
from hpmkd.registry import ConfigError, did_you_mean

#: ``mtbkd.sampler`` keys: the sampling phase's own training settings (its length is ``mtbkd.sample_epochs``; it
#: shares the stage's batches)
SAMPLER_KEYS = ("optimizer", "optimizer_options", "lr", "momentum", "nesterov", "weight_decay", "lr_schedule",
                "lr_schedule_options", "lr_milestones", "lr_gamma", "warmup_epochs")
#: distance between the initialisation seeds of two chains (or two ensemble members)
SEED_STRIDE = 1000


@SECTIONS.register("mtbkd")
@dataclass
class MtbkdConfig:
    """MT-BKD's posterior sampling (pipeline ``mtbkd``; module docstring and docs/mtbkd.md).

    ``sample_epochs``: epochs of Langevin sampling after the posterior-mode epochs (``train.epochs``); 0: the mode
    only. ``sampler``: the sampling phase's optimiser and step size (keys of ``train``: :data:`SAMPLER_KEYS`; the
    reference's SGLD, ``ε₁ = 8e-8``, ``ε₂ = 4e-4``, constant, by default). ``burn_in``, ``thin``: sampling steps
    discarded first, and between two kept samples (``null``: spread ``samples`` over the rest). ``params``: which
    parameters are sampled, ``head`` (the classifier layer, as the reference) or ``all``. ``chains``: independent
    chains run side by side and pooled. ``predict``: ``bma`` (the average of the samples' distributions) or
    ``kde_mode`` (the reference's per-class KDE mode). ``deep_ensemble``: D ≥ 2 adds a baseline, D students trained
    alone from different initialisations, pooled (0: none).
    """

    sample_epochs: int = 5
    sampler: dict[str, Any] = field(
        default_factory=lambda: {"optimizer": "sgld", "lr": 8e-8, "optimizer_options": {"noise": 4e-4}})
    burn_in: int = 100
    thin: int | None = None
    samples: int = 32
    params: Literal["head", "all"] = "head"
    chains: int = 1
    predict: Literal["bma", "kde_mode"] = "bma"
    deep_ensemble: int = 0

    def check(self, path: str) -> None:
        for key in ("sample_epochs", "burn_in"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{join(path, key)}: must be >= 0, got {getattr(self, key)}.")
        for key in ("samples", "chains"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{join(path, key)}: must be >= 1, got {getattr(self, key)}.")
        if self.thin is not None and self.thin < 1:
            raise ConfigError(f"{join(path, 'thin')}: must be >= 1 (or null: spread the samples), got {self.thin}.")
        if self.deep_ensemble == 1 or self.deep_ensemble < 0:
            raise ConfigError(f"{join(path, 'deep_ensemble')}: 0 (no deep-ensemble baseline) or the number of "
                              f"members, at least 2; got {self.deep_ensemble}.")
        if self.sample_epochs == 0 and self.chains > 1:
            raise ConfigError(f"{join(path, 'chains')}: {self.chains} chains need sampling; sample_epochs is 0 (the "
                              f"posterior mode only). Set sample_epochs >= 1, or chains: 1.")
        for key in self.sampler:
            if key not in SAMPLER_KEYS:
                raise ConfigError(f"{join(path, 'sampler')}.{key}: not a sampling-phase key."
                                  f"{did_you_mean(str(key), SAMPLER_KEYS)} Allowed: {', '.join(SAMPLER_KEYS)} (the "
                                  f"phase lasts {join(path, 'sample_epochs')} epochs on the stage's batches).")

    def check_with(self, cfg: ExperimentConfig) -> None:
        if self.sample_epochs:
            check_train(self.sampler_train(cfg.recipe().train), "mtbkd.sampler")

    def check_data(self, cfg: ExperimentConfig, splits: Any) -> None:
        """Before any stage runs: the sampling phase has room for ``burn_in + thin · samples`` steps."""
        if cfg.pipeline == "mtbkd" and self.sample_epochs:
            train = cfg.recipe().train
            steps_per_epoch = math.ceil(len(splits.train) / (train.batch_size * cfg.ray.num_workers))
            self.sampling(cfg.recipe()).check_steps(steps_per_epoch)

    def sampler_train(self, base: TrainConfig) -> TrainConfig:
        """The sampling phase's training settings: ``base`` (its batches) with the sampler's keys; keys the sampler
        leaves out are the reference's SGLD step size ``ε₁ = 8e-8`` with the Langevin noise ``√(2 ε₁)``, constant,
        without warm-up (never the mode phase's optimiser or step size)."""
        fresh = {"optimizer": "sgld", "lr": 8e-8, "optimizer_options": {}, "lr_schedule": "constant",
                 "lr_schedule_options": {}, "warmup_epochs": 0}
        return merged_train(base, {**fresh, **self.sampler, "epochs": self.sample_epochs}, "mtbkd.sampler")

    def sampling(self, recipe: Recipe) -> PosteriorSampling:
        """A chain's sampling, after the recipe's ``train.epochs`` of posterior-mode optimisation."""
        return PosteriorSampling(recipe.train.epochs, self.sampler_train(recipe.train), self.burn_in, self.thin,
                                 self.samples, self.params, self.predict, where="mtbkd")


@dataclass(frozen=True)
class PosteriorChain(Distill):
    """One chain of MT-BKD: the distillation ``recipe`` (its ``train.epochs`` = posterior-mode epochs + sampling
    epochs) with ``sampling``; ``init_seed``: the chain's own initialisation and noise (``None``: the experiment
    seed's)."""

    kind = "posterior_chain"
    sampling: PosteriorSampling | None = None
    init_seed: int | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "sampling": to_dict(self.sampling),
                **({"init_seed": self.init_seed} if self.init_seed is not None else {})}


@dataclass(frozen=True)
class PoolPredictors(StageParams):
    """One predictor from the models of the input stages ``members`` (all of architecture ``model``): every
    sample or member they hold, with equal weights, predicting as ``predict`` says (``bma`` or ``kde_mode``).
    Several posterior chains pool into one posterior; students trained alone pool into a deep ensemble."""

    kind = "pool_predictors"
    model: ModelRef
    members: tuple[str, ...]
    predict: Literal["bma", "kde_mode"] = "bma"

    def settings(self) -> dict[str, Any]:
        return {"model": self.model.model, "options": self.model.options, "members": list(self.members),
                "predict": self.predict}


def init_seed(cfg: ExperimentConfig, index: int) -> int | None:
    """The initialisation seed of chain (or ensemble member) ``index``: the experiment's own for 0."""
    return None if index == 0 else cfg.seed + SEED_STRIDE * index


def deep_ensemble_stages(cfg: ExperimentConfig) -> list[Stage]:
    """``mtbkd.deep_ensemble`` students trained alone from different initialisations (``student_alone`` is the
    first when ``distill.baseline``), and ``deep_ensemble``, their pooled predictor."""
    size = cfg.mtbkd.deep_ensemble
    if not size:
        return []
    first = 1 if cfg.distill.baseline else 0
    members = [Stage(f"ensemble_{k + 1}", TrainModel(cfg.student.ref, cfg.student_train(), init_seed=init_seed(cfg, k)),
                     cpus=worker_cpus(cfg)) for k in range(first, size)]
    names = ["student_alone"] * first + [m.name for m in members]
    return [*members, Stage("deep_ensemble", PoolPredictors(cfg.student.ref, tuple(names)), deps=names, cpus=1.0)]


@PIPELINES.register("mtbkd")
def mtbkd_pipeline(cfg: ExperimentConfig) -> list[Stage]:
    settings: MtbkdConfig = cfg.mtbkd
    teacher_graph = teacher_stages(cfg)
    teachers = [t.name for t in teacher_graph]
    stages = [*teacher_graph, *baseline_stages(cfg), *deep_ensemble_stages(cfg)]
    if not settings.sample_epochs:
        return [*stages, distill_stage(cfg, "mtbkd", teachers)]
    recipe = cfg.recipe()
    sampling = settings.sampling(recipe)
    chained = Recipe(recipe.distill, replace(recipe.train, epochs=recipe.train.epochs + settings.sample_epochs))
    names = ["mtbkd"] if settings.chains == 1 else [f"mtbkd_chain_{k + 1}" for k in range(settings.chains)]
    chains = [distill_stage(cfg, name, teachers, PosteriorChain, recipe=chained, sampling=sampling,
                            init_seed=init_seed(cfg, k)) for k, name in enumerate(names)]
    if settings.chains == 1:
        return [*stages, *chains]
    pool = Stage("mtbkd", PoolPredictors(cfg.student.ref, tuple(names), settings.predict), deps=names, cpus=1.0)
    return [*stages, *chains, pool]
