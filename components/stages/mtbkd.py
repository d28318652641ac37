"""Stage kinds of MT-BKD (:mod:`hpmkd.pipelines.mtbkd`): ``posterior_chain`` (one chain: a distillation whose
training loop runs the posterior mode, then Langevin sampling, and selects the thinned samples,
:mod:`hpmkd.posterior`) and ``pool_predictors`` (several chains, or several students, pooled into one predictor).

A chain is a distillation (teachers served or cached as for ``distill``, :func:`distill_setup`) recorded like every
training stage: its ``model.pt`` is a weight-sample predictor, its metrics add ``posterior_samples`` and the split
R-hat of its samples' validation log-likelihood (``val_loglik_rhat``), and per epoch ``posterior_phase``. The pool
stage trains nothing: it reads its inputs' predictors (chains' samples, or single models), writes the pooled
predictor as its ``model.pt`` (equal weights), measures it on validation (accuracy, NLL and, for chains, the split
R-hat across them) and on the test split (every registered test metric), in the driver, on the CPU.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from hpmkd import checkpoint
from hpmkd.components.graph import ModelArtifact, Stage, StageOutcome, StageResult
from hpmkd.components.stages.base import STAGE_KINDS, ExperimentContext, StageKind, StageRun
from hpmkd.components.stages.distill import distill_setup
from hpmkd.components.stages.train import record_model, selected, train_and_record
from hpmkd.evaluation import measure, predict_final
from hpmkd.pipelines.mtbkd import PoolPredictors, PosteriorChain
from hpmkd.posterior import POSTERIOR, PREDICTOR_KINDS, PosteriorSamples, validation_summary
from hpmkd.predictors import PREDICTOR_KEY, SingleModel, predictor_from_payload, predictor_kind, read_predictor_payload
from hpmkd.predictors import save_predictor


@STAGE_KINDS.register("posterior_chain")
class PosteriorChainKind(StageKind):
    """One MT-BKD chain (:class:`~hpmkd.pipelines.mtbkd.PosteriorChain`)."""

    def run(self, stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
        params: PosteriorChain = stage.params
        with distill_setup(stage, ctx, params, inputs, run) as (spec, plan):
            spec = replace(spec, selection=PosteriorSamples.name, callback_options={POSTERIOR: params.sampling},
                           init_seed=params.init_seed)
            return train_and_record(stage, ctx, run, spec, stage.name, plan.pools, plan.cache)


def members_of(payload: Any) -> list[dict[str, torch.Tensor]]:
    """The weight sets a predictor payload holds: one for a single model, every sample or member otherwise."""
    return [payload] if predictor_kind(payload) == SingleModel.kind else list(payload["members"])


@STAGE_KINDS.register("pool_predictors")
class PoolKind(StageKind):
    """Pool the input stages' predictors (:class:`~hpmkd.pipelines.mtbkd.PoolPredictors`)."""

    def run(self, stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
        params: PoolPredictors = stage.params
        groups = [members_of(read_predictor_payload(inputs[name].model().path)) for name in params.members]
        payload = {PREDICTOR_KEY: PREDICTOR_KINDS[params.predict], "members": [m for g in groups for m in g]}
        folder = ctx.out_dir / stage.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / checkpoint.MODEL_FILE
        save_predictor(payload, path)
        predictor = predictor_from_payload(params.model, ctx.splits.shape, payload)
        cpu, batch = torch.device("cpu"), ctx.cfg.train.eval_batch_size
        chains = len(groups) if len({len(g) for g in groups}) == 1 and len(groups[0]) > 1 else 1
        predicted = predict_final(predictor, ctx.splits, batch, cpu, ctx.cfg.evaluation)
        found = validation_summary(predicted.test.calibration, chains)
        if chains == 1:  # single models, or chains of unequal length: no R-hat across them
            found.pop("val_loglik_rhat")
        metrics = {**found, "test_acc": predicted.test.accuracy, "test_loss": predicted.test.loss,
                   "params": float(params.model.count_params(ctx.splits.shape)),
                   "pooled_members": float(len(payload["members"])),
                   **measure(predicted, ctx.cfg.evaluation)}
        record_model(ctx, run, params.model, path, None, as_mlflow_model=ctx.cfg.mlflow.log_models)
        artifact = ModelArtifact(stage.name, params.model, str(path), checkpoint.file_digest(path),
                                 int(metrics["params"]), selected(metrics))
        return StageOutcome(metrics, artifact)
