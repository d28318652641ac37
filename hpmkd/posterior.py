"""Posterior sampling in one training stage: a posterior-mode phase, then Langevin sampling, and the thinned samples
as the stage's predictor (MT-BKD, Fang et al., arXiv 2605.27967; reference code ``AnonymousSub1/MTBKD``).

A stage whose ``StageSpec.callback_options`` holds a :class:`PosteriorSampling` under :data:`POSTERIOR` runs, in one
resumable training loop:

1. **posterior mode** (epochs ``0 … mode_epochs − 1``): the stage's own optimiser and LR schedule (over those
   epochs), minimising the stage's objective (for MT-BKD: cross-entropy plus the negative log teacher-informed prior,
   :mod:`hpmkd.losses.mtbkd`);
2. **sampling** (the next ``sampler.epochs`` epochs): :class:`LangevinPhases` switches ``state.optimizer`` and
   ``state.scheduler`` to the sampler (``sgld`` / ``psgld``, :mod:`hpmkd.langevin`, with its own step size and
   schedule) over the ``head`` (the classifier layer, as the reference samples only its classifier head; the rest
   stays at the mode, its BatchNorm statistics frozen) or ``all`` parameters;
3. the selection :class:`PosteriorSamples` (``StageSpec.selection = "posterior_samples"``) keeps, after
   ``burn_in`` sampling steps, every ``thin``-th state until ``samples`` are kept (``thin: null`` spreads them over
   the rest of the sampling steps), and gives them as a :class:`~hpmkd.predictors.WeightSamples` predictor (the
   Bayesian model average), or :class:`~hpmkd.predictors.KdeModeSamples` (``predict: kde_mode``, the reference's
   prediction).

Both the phase and the kept samples are checkpointed (state keys ``posterior_phase`` and ``posterior``), and the
loop restores a resumed stage's optimiser after ``on_start``, so a stage stopped mid-chain resumes with the
sampler's state and draws the samples an uninterrupted run would. The selection reports the number of samples, the
posterior predictive's validation accuracy and NLL, and the split R-hat of the samples' validation log-likelihood
(:func:`hpmkd.uncertainty.split_rhat`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from hpmkd.callbacks import CALLBACKS, Callback, LoopState
from hpmkd.config import TrainConfig
from hpmkd.evaluation import Predictions, predict
from hpmkd.models import model_taps
from hpmkd.optim import lr_factor, make_optimizer
from hpmkd.predictors import PREDICTOR_KEY, KdeModeSamples, WeightSamples
from hpmkd.registry import ConfigError
from hpmkd.selection import SELECTIONS, Selection
from hpmkd.uncertainty import split_rhat

#: the name :class:`LangevinPhases` is registered under, and the key of its options in ``StageSpec.callback_options``
POSTERIOR = "posterior_sampling"
#: ``predict`` option -> the predictor kind of the kept samples
PREDICTOR_KINDS = {"bma": WeightSamples.kind, "kde_mode": KdeModeSamples.kind}


@dataclass(frozen=True)
class PosteriorSampling:
    """A two-phase stage's sampling (module docstring). ``sampler`` is the sampling phase's training settings: its
    optimiser, step size (``lr``), schedule and number of epochs (``epochs``); the stage trains ``mode_epochs +
    sampler.epochs`` epochs. ``burn_in`` and ``thin`` count optimisation steps of the sampling phase. ``where``:
    the config key path the options came from (named in errors)."""

    mode_epochs: int
    sampler: TrainConfig
    burn_in: int = 100
    thin: int | None = None
    samples: int = 32
    params: Literal["head", "all"] = "head"
    predict: Literal["bma", "kde_mode"] = "bma"
    where: str = "posterior"

    def sampling_steps(self, steps_per_epoch: int) -> int:
        return self.sampler.epochs * steps_per_epoch

    def thinning(self, steps_per_epoch: int) -> int:
        """``thin``, or the spacing that spreads ``samples`` over the sampling steps after the burn-in."""
        if self.thin is not None:
            return self.thin
        return (self.sampling_steps(steps_per_epoch) - self.burn_in) // self.samples

    def check_steps(self, steps_per_epoch: int) -> None:
        """The sampling phase is long enough for the burn-in and the kept samples; a :class:`ConfigError` saying how
        to fix it otherwise."""
        steps, thin = self.sampling_steps(steps_per_epoch), max(1, self.thinning(steps_per_epoch))
        needed = self.burn_in + thin * self.samples
        if needed > steps:
            raise ConfigError(
                f"{self.where}: {self.sampler.epochs} sampling epochs of {steps_per_epoch} steps give {steps} steps, "
                f"fewer than the {needed} that burn_in ({self.burn_in}) + thin ({thin}) x samples ({self.samples}) "
                f"need. Raise {self.where}.sample_epochs, or lower {self.where}.samples, {self.where}.thin or "
                f"{self.where}.burn_in.")

    def keeps(self, step: int, steps_per_epoch: int) -> bool:
        """Whether sampling step ``step`` (1-based) is kept: ``burn_in + k · thin`` for ``k = 1 … samples``."""
        after, thin = step - self.burn_in, self.thinning(steps_per_epoch)
        return after > 0 and after % thin == 0 and after // thin <= self.samples


def options_of(state: LoopState) -> PosteriorSampling:
    return state.spec.callback_options[POSTERIOR]


def head_of(model: nn.Module) -> nn.Module:
    """The model's classifier layer (``model.taps.classifier_tap``)."""
    return model.get_submodule(model_taps(model).classifier_tap)


def sampled_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """The parameters the sampler moves: the classifier layer's (``head``) or every one (``all``)."""
    return list((head_of(model) if which == "head" else model).parameters())


def freeze_batch_norm_statistics(model: nn.Module, keep: nn.Module) -> None:
    """Stop the running statistics of every BatchNorm layer outside ``keep`` from moving (momentum 0)."""
    inside = set(map(id, keep.modules()))
    for module in model.modules():
        if isinstance(module, _BatchNorm) and id(module) not in inside:
            module.momentum = 0.0


@CALLBACKS.register(POSTERIOR)
class LangevinPhases(Callback):
    """Posterior mode, then Langevin sampling, in one stage (module docstring); metric ``posterior_phase`` (0: mode,
    1: sampling) per epoch."""

    state_key = "posterior_phase"

    @classmethod
    def applies(cls, state: LoopState) -> bool:
        return POSTERIOR in state.spec.callback_options

    def __init__(self) -> None:
        self.phase = 0

    def on_start(self, state: LoopState) -> None:
        options = options_of(state)
        options.check_steps(state.steps_per_epoch)
        if self.phase == 0:  # the mode's LR schedule runs over the mode epochs, not the whole stage
            steps = options.mode_epochs * state.steps_per_epoch
            state.scheduler = torch.optim.lr_scheduler.LambdaLR(
                state.optimizer, lr_factor(state.spec.train, steps, state.steps_per_epoch))
        else:
            self.switch(state)

    def on_epoch_start(self, state: LoopState) -> None:
        if self.phase == 0 and state.epoch >= options_of(state).mode_epochs:
            self.phase = 1
            self.switch(state)

    def switch(self, state: LoopState) -> None:
        """The sampler over the sampled parameters, with its own step-size schedule over the sampling steps."""
        options = options_of(state)
        if options.params == "head":
            freeze_batch_norm_statistics(state.model, head_of(state.model))
        state.optimizer = make_optimizer(sampled_parameters(state.model, options.params), options.sampler,
                                         len(state.splits.train))
        state.scheduler = torch.optim.lr_scheduler.LambdaLR(
            state.optimizer,
            lr_factor(options.sampler, options.sampling_steps(state.steps_per_epoch), state.steps_per_epoch))

    def on_evaluate(self, state: LoopState, metrics: dict[str, float]) -> None:
        metrics["posterior_phase"] = float(self.phase)

    def state_dict(self) -> Any:
        return self.phase

    def load_state_dict(self, state: Any) -> None:
        self.phase = int(state)


@SELECTIONS.register("posterior_samples")
class PosteriorSamples(Selection):
    """The thinned Langevin samples (module docstring) as a weight-sample predictor."""

    name = "posterior_samples"
    state_key = "posterior"

    def __init__(self) -> None:
        self.kept: dict[str, Any] = {"kind": WeightSamples.kind, "samples": [], "steps": []}
        self.found: dict[str, float] = {}

    def on_start(self, state: LoopState) -> None:
        options = options_of(state)
        self.kept["kind"] = PREDICTOR_KINDS[options.predict]
        self.first_step = options.mode_epochs * state.steps_per_epoch

    def after_step(self, state: LoopState) -> None:
        if options_of(state).keeps(state.step - self.first_step, state.steps_per_epoch):
            self.kept["samples"].append({k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()})
            self.kept["steps"].append(state.step)

    def state_dict(self) -> Any:
        return self.kept

    def load_state_dict(self, state: Any) -> None:
        self.kept = state

    def payload(self) -> Any:
        return self.payload_from_state({self.state_key: self.kept})

    @classmethod
    def payload_from_state(cls, state: dict[str, Any]) -> Any:
        kept = state[cls.state_key]
        return {PREDICTOR_KEY: kept["kind"], "members": kept["samples"]}

    def predictor(self, state: LoopState) -> nn.Module:
        """The samples' predictor; measures its validation accuracy and NLL and the samples' R-hat on the way."""
        predictor = super().predictor(state)
        self.found = validation_summary(predict(predictor, state.splits.val, state.spec.train.eval_batch_size,
                                                state.env.device))
        return predictor

    def summary(self) -> dict[str, float]:
        return {**self.found, "posterior_samples": float(len(self.kept["samples"]))}


def sample_log_likelihoods(predictions: Predictions) -> Tensor:
    """Each member's mean validation log-likelihood ``(1/N) Σ_i log p_s(y_i | x_i)``, ``[S]``."""
    index = predictions.y[None, :, None].expand(len(predictions.members), -1, 1)
    return predictions.members.gather(2, index)[..., 0].double().mean(1)


def validation_summary(predictions: Predictions, chains: int = 1) -> dict[str, float]:
    """``val_acc`` and ``val_loss`` of the predictive distribution, and ``val_loglik_rhat``: the split R-hat of the
    members' validation log-likelihood with the members taken as ``chains`` equal consecutive chains."""
    trace = sample_log_likelihoods(predictions)
    return {"val_acc": float((predictions.log_probs.argmax(1) == predictions.y).double().mean()),
            "val_loss": float(-predictions.log_probs.gather(1, predictions.y[:, None]).double().mean()),
            "val_loglik_rhat": split_rhat(trace.reshape(chains, -1))}
