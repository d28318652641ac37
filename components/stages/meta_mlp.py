"""Stage kind ``meta_mlp``: HumP-KD's Meta-MLP ensemble teacher (:class:`hpmkd.pipelines.humpkd.FitMetaMLP`).

1. The base teachers (the models of the stage's ``members`` inputs) are hosted by teacher actors, which compute
   their logits once into the logit cache (float32) on three sources: the training split, the validation split and
   the test split; the actors are then released.
2. The head is fitted on the outputs of the training split's held-out rows (:class:`hpmkd.data.holdout.HoldOut`,
   which the pipeline's teachers never trained on) and the epoch with the best validation accuracy is kept
   (:func:`hpmkd.meta_fit.fit_head`); the stacked model (members' weights and the head's,
   :class:`hpmkd.models.meta_mlp.MetaMLP`) is written as one ``model.pt`` and handed on as a
   :class:`~hpmkd.components.graph.ModelArtifact`: a teacher like any other for later stages.
3. Validation and test metrics come from the cached outputs (the test split read once, for the selected head); the
   shifted test splits (`evaluation.shifts`) and the optional speed measures run the stacked model on the test split.

The run records the held-out rows' count (``holdout_rows``), each epoch's head metrics, and tag
``holdout_verified``: ``true`` when every member was trained by this experiment with the same held-out rows
excluded, ``false`` when one was loaded from a checkpoint (its training rows are unknown).
"""

from __future__ import annotations

from typing import Any

import torch

from hpmkd import checkpoint
from hpmkd.components.graph import ModelArtifact, Stage, StageOutcome, StageResult
from hpmkd.components.cache_fill import FillOnDemand
from hpmkd.components.logit_cache import ensure_cached
from hpmkd.components.stages.base import STAGE_KINDS, ExperimentContext, StageKind, StageRun
from hpmkd.data.source import BatchSource
from hpmkd.evaluation import final_test_metrics
from hpmkd.logit_cache import CachedLogits
from hpmkd.meta_fit import accuracy_and_loss, fit_head
from hpmkd.models import count_params, load_state_checked
from hpmkd.models.meta_mlp import MetaMLP, stacked
from hpmkd.pipelines.humpkd import FitMetaMLP
from hpmkd.predictors import SingleModel, predictor_kind, read_predictor_payload, save_predictor
from hpmkd.teachers import TeacherSpec

#: the cache holds the members' logits exactly: the head sees what the stacked model computes
CACHE_DTYPE = "float32"


def member_logits(ctx: ExperimentContext, params: FitMetaMLP, members: list[ModelArtifact],
                  sources: dict[str, BatchSource]) -> dict[str, torch.Tensor]:
    """Per source, the members' logits ``[M, N, C]``, computed into the logit cache (``ray.cache_fill``)."""
    cfg = ctx.cfg
    specs = [TeacherSpec(a.name, a.model, ctx.splits.shape) for a in members]
    filler = FillOnDemand(cfg.ray, specs, [a.path for a in members])
    try:
        out = {}
        for split, source in sources.items():
            uses = ensure_cached(filler, specs, [a.path for a in members], source, root=str(cfg.cache_root()),
                                 fingerprint=ctx.splits.fingerprint, split=split, dtype=CACHE_DTYPE)[0]
            index = torch.arange(len(source))
            out[split] = torch.stack([CachedLogits(u.path).rows(index) for u in uses])
        return out
    finally:
        filler.release()


@STAGE_KINDS.register("meta_mlp")
class MetaMLPKind(StageKind):
    """See the module docstring."""

    def run(self, stage: Stage, ctx: ExperimentContext, inputs: dict[str, StageResult], run: StageRun) -> StageOutcome:
        params: FitMetaMLP = stage.params
        members = [inputs[name].model() for name in params.members]
        payloads = [read_predictor_payload(a.path) for a in members]
        for artifact, payload in zip(members, payloads):
            if predictor_kind(payload) != SingleModel.kind:
                raise ValueError(f"stage {stage.name}: member {artifact.name!r} is a {predictor_kind(payload)} "
                                 f"predictor; the Meta-MLP stacks single models.")
        held = params.holdout.held(ctx.splits.train)
        sources = {"train": ctx.splits.train, "val": ctx.splits.val, "test": ctx.splits.test}
        logits = member_logits(ctx, params, members, sources)
        logits["holdout"] = logits.pop("train")[:, held.positions]  # the rows the members did not train on
        model: MetaMLP = params.model.build(ctx.splits.shape)
        for member, payload in zip(model.members, payloads):
            load_state_checked(member, payload)
        inputs_kind = model.inputs
        train = (stacked(logits["holdout"], inputs_kind), held.y)
        val = (stacked(logits["val"], inputs_kind), ctx.splits.val.y)
        fit = fit_head(model.head, train, val, params.train, ctx.cfg.seed)
        model.head.load_state_dict(fit.state)
        for row in fit.history:
            ctx.tracker.log_metrics(run.run_id, {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        test_x = stacked(logits["test"], inputs_kind)
        test_acc, test_loss = accuracy_and_loss(model.head, test_x, ctx.splits.test.y)
        batch = ctx.cfg.train.eval_batch_size
        folder = ctx.out_dir / stage.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / checkpoint.MODEL_FILE
        save_predictor(SingleModel(model).payload(), path)
        ctx.tracker.log_artifact(run.run_id, path, "checkpoint")
        verified = all(inputs[name].kind == "train_teacher" for name in params.members)
        ctx.tracker.set_tags(run.run_id, {"holdout_verified": str(verified).lower()})
        size = count_params(model)
        metrics: dict[str, Any] = {
            "val_acc": fit.val_acc, "val_loss": fit.val_loss, "test_acc": test_acc, "test_loss": test_loss,
            "selected_epoch": float(fit.epoch), "params": float(size), "holdout_rows": float(len(held)),
            **final_test_metrics(SingleModel(model), ctx.splits, batch, torch.device("cpu"), ctx.cfg.evaluation)}
        artifact = ModelArtifact(params.name, params.model, str(path), checkpoint.file_digest(path), size,
                                 {k: metrics[k] for k in ("val_acc", "val_loss", "test_acc", "test_loss")})
        return StageOutcome(metrics, artifact)
