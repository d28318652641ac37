"""Predictors: what a stage selects, evaluates, exports, caches and serves.

A predictor is an ``nn.Module`` that maps a batch to class scores whose ``log_softmax`` is its log predictive
distribution:

* :class:`SingleModel`: one network; its scores are the network's logits (today's case for every stage);
* :class:`WeightSamples`: one architecture with several weight samples (a posterior, e.g. Langevin samples); the
  predictive distribution is the average of the samples' distributions, ``p(y|x) = (1/S) Σ_s softmax(f_{θ_s}(x))``,
  and the scores are its logarithm;
* :class:`Ensemble`: several networks (possibly different architectures sharing one output space), averaged the same
  way;
* :class:`KdeModeSamples`: weight samples whose prediction is, per class, the mode of a kernel density estimate of
  the samples' probabilities, renormalised (MT-BKD's reference prediction, :func:`hpmkd.uncertainty.kde_modes`).

A predictor of several members also has ``outputs(x) -> (scores, member log-probabilities [S, B, C])``, from which
the per-input uncertainty is computed (:mod:`hpmkd.uncertainty`).

Checkpoint format (``model.pt``, read with ``torch.load(weights_only=True)``, :func:`save_predictor` /
:func:`load_predictor`):

* a single model is its plain state dict (so a ``model.pt`` is also a teacher ``checkpoint``);
* otherwise ``{"predictor": "weight_samples" | "kde_mode" | "ensemble", "members": [state_dict, ...], "weights": [w,
  ...]}``: one
  state dict per sample or member (an ensemble's members all have the architecture of the reference it is loaded
  with) and the mixture weights (uniform when absent).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hpmkd.checkpoint import load, model_state_of, save_atomic
from hpmkd.models.ref import DataShape, ModelRef
from hpmkd.models.state import load_state_checked
from hpmkd.registry import Registry
from hpmkd.uncertainty import kde_modes

PREDICTOR_KEY = "predictor"


def mixture_log_probs(log_probs: Tensor, weights: Tensor) -> Tensor:
    """``log Σ_s w_s p_s`` from per-member log-probabilities ``[S, B, C]`` and weights ``[S]`` (summing to 1)."""
    return torch.logsumexp(log_probs + weights.log().view(-1, 1, 1), dim=0)


class SingleModel(nn.Module):
    """One network; scores are its logits."""

    kind = "single"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def payload(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


class WeightSamples(nn.Module):
    """One architecture, ``S`` weight samples; scores are ``log (1/S) Σ_s softmax(f_{θ_s}(x))`` (Bayesian model
    average). :meth:`member_log_probs` gives the per-sample log-probabilities ``[S, B, C]`` (for epistemic
    uncertainty)."""

    kind = "weight_samples"

    def __init__(self, model: nn.Module, samples: list[Mapping[str, Tensor]], weights: list[float] | None = None):
        super().__init__()
        if not samples:
            raise ValueError("a weight-sample predictor needs at least one sample.")
        self.model = model
        self.samples = [dict(s) for s in samples]
        self.register_buffer("weights", uniform_or(weights, len(samples)), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """``to(device)``, ``double()`` ... move and cast the samples as they do the module's own tensors."""
        super()._apply(fn, recurse)
        self.samples = [{k: fn(v) for k, v in s.items()} for s in self.samples]
        return self

    def member_log_probs(self, x: Tensor) -> Tensor:
        return torch.stack([torch.log_softmax(functional_call(self.model, s, (x,)), -1) for s in self.samples])

    def scores(self, members: Tensor) -> Tensor:
        """The predictive log-probabilities from the members' ``[S, B, C]``."""
        return mixture_log_probs(members, self.weights)

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        members = self.member_log_probs(x)
        return self.scores(members), members

    def forward(self, x: Tensor) -> Tensor:
        return self.scores(self.member_log_probs(x))

    def payload(self) -> dict[str, Any]:
        return {PREDICTOR_KEY: self.kind, "members": [{k: v.detach().cpu() for k, v in s.items()} for s in self.samples],
                "weights": self.weights.tolist()}


class KdeModeSamples(WeightSamples):
    """Weight samples predicting, per class, the mode of a kernel density estimate of the samples' probabilities,
    renormalised over the classes: ``p(y = c | x) ∝ mode_KDE({p_s,c(x)})`` (MT-BKD's reference notebook,
    ``AnonymousSub1/MTBKD`` ``pred_deviance_infer_git.ipynb``). The sample weights are not used by the KDE."""

    kind = "kde_mode"

    def scores(self, members: Tensor) -> Tensor:
        modes = kde_modes(members).clamp_min(torch.finfo(members.dtype).tiny)
        return modes.log() - modes.sum(-1, keepdim=True).log()


class Ensemble(nn.Module):
    """Several networks; scores are ``log Σ_m w_m softmax(f_m(x))``."""

    kind = "ensemble"

    def __init__(self, models: list[nn.Module], weights: list[float] | None = None):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model.")
        self.members = nn.ModuleList(models)
        self.register_buffer("weights", uniform_or(weights, len(models)), persistent=False)

    def member_log_probs(self, x: Tensor) -> Tensor:
        return torch.stack([torch.log_softmax(m(x), -1) for m in self.members])

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        members = self.member_log_probs(x)
        return mixture_log_probs(members, self.weights), members

    def forward(self, x: Tensor) -> Tensor:
        return mixture_log_probs(self.member_log_probs(x), self.weights)

    def payload(self) -> dict[str, Any]:
        return {PREDICTOR_KEY: self.kind, "members": [{k: v.detach().cpu() for k, v in m.state_dict().items()}
                                                      for m in self.members], "weights": self.weights.tolist()}


def uniform_or(weights: list[float] | None, count: int) -> Tensor:
    if weights is None:
        return torch.full((count,), 1.0 / count)
    w = torch.tensor([float(v) for v in weights])
    if len(w) != count or (w < 0).any() or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-5):
        raise ValueError(f"mixture weights must be {count} non-negative numbers summing to 1, got {weights}.")
    return w


#: predictor kind in a checkpoint -> ``(ref, shape, payload) -> predictor``
LOADERS: Registry[nn.Module] = Registry("predictor")


@LOADERS.register(WeightSamples.kind)
@LOADERS.register(KdeModeSamples.kind)
def load_samples(ref: ModelRef, shape: DataShape, payload: dict[str, Any]) -> nn.Module:
    model = ref.build(shape)
    for member in payload["members"]:
        load_state_checked(model, member)
    kind = KdeModeSamples if payload[PREDICTOR_KEY] == KdeModeSamples.kind else WeightSamples
    return kind(model, payload["members"], payload.get("weights"))


@LOADERS.register(Ensemble.kind)
def load_ensemble(ref: ModelRef, shape: DataShape, payload: dict[str, Any]) -> nn.Module:
    models = []
    for member in payload["members"]:
        model = ref.build(shape)
        load_state_checked(model, member)
        models.append(model)
    return Ensemble(models, payload.get("weights"))


def predictor_kind(payload: Any) -> str:
    """``single`` for a plain state dict, else the checkpoint's ``predictor`` entry."""
    return payload[PREDICTOR_KEY] if isinstance(payload, dict) and PREDICTOR_KEY in payload else SingleModel.kind


def predictor_from_payload(ref: ModelRef, shape: DataShape, payload: Any) -> nn.Module:
    """Build the predictor a checkpoint payload describes (see the module docstring)."""
    kind = predictor_kind(payload)
    if kind == SingleModel.kind:
        model = ref.build(shape)
        load_state_checked(model, payload)
        return SingleModel(model)
    return LOADERS.get(kind, "predictor checkpoint")(ref, shape, payload)


def read_predictor_payload(path: str) -> Any:
    """The predictor payload in ``path`` (weights only): a ``model.pt``, or a training state ``state.pt`` (its
    selected model)."""
    payload = load(path)
    return model_state_of(payload, path) if predictor_kind(payload) == SingleModel.kind else payload


def load_predictor(path: str, ref: ModelRef, shape: DataShape) -> nn.Module:
    """The predictor in ``path`` for architecture ``ref`` and data ``shape``."""
    return predictor_from_payload(ref, shape, read_predictor_payload(path))


def save_predictor(payload: Any, path: str) -> None:
    """Write a predictor's checkpoint payload (``predictor.payload()``) atomically."""
    save_atomic(payload, path)
