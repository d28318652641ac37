"""Per-input uncertainty of a predictor made of several members (posterior weight samples, an ensemble), and the
quantities built on it: credible intervals, prediction sets calibrated on validation, the reference's KDE-mode
prediction and the convergence diagnostic R-hat.

With member distributions ``p_s(y|x)`` (``s = 1..S``, weights ``w_s``) and their average ``p̄ = Σ_s w_s p_s`` (the
Bayesian model average):

* predictive entropy ``H[p̄] = −Σ_c p̄_c log p̄_c`` (total uncertainty, nats);
* expected entropy ``E_s H[p_s]`` (aleatoric part);
* mutual information ``H[p̄] − E_s H[p_s]`` (epistemic part: how much the members disagree; Houlsby et al. 2011,
  "Bayesian Active Learning by Disagreement", arXiv 1112.5745);
* deviance ``E_s Σ_c −2 p_s,c log p_s,c`` (MT-BKD's uncertainty score, reference code ``AnonymousSub1/MTBKD``,
  ``pred_deviance_infer_git.ipynb``; it is twice the expected entropy);
* per class, the equal-tailed credible interval of ``p_s,c`` over the members at a level (e.g. 95 %);
* prediction sets ``{c : p̄_c ≥ 1 − q̂}`` with ``q̂`` the ``⌈(n+1)·coverage⌉/n`` empirical quantile of ``1 − p̄_y``
  on the validation split: split-conformal sets with the least-ambiguous-set score (Sadinle, Lei, Wasserman 2019,
  "Least Ambiguous Set-Valued Classifiers with Bounded Error Levels", JASA), which cover the true class with
  probability at least ``coverage`` on exchangeable data.

A single network is one member: its expected entropy equals its predictive entropy and its mutual information is 0.
:func:`posterior_outputs` gives all of it for a batch of inputs from any predictor (:mod:`hpmkd.predictors`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: points of the KDE-mode grid over [0, 1] (the reference notebook's 600-point grid)
KDE_GRID = 600


def entropy(log_probs: Tensor) -> Tensor:
    """``−Σ_c p_c log p_c`` over the last dimension, from log-probabilities (``p_c = 0`` contributes 0)."""
    return -(log_probs.exp() * log_probs).sum(-1)


@dataclass
class Uncertainty:
    """Per-input uncertainty ``[N]`` of a predictor's predictions (see the module docstring)."""

    predictive_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    deviance: Tensor


def uncertainty(log_probs: Tensor, members: Tensor | None = None) -> Uncertainty:
    """The per-input quantities of the module docstring from the predictive log-probabilities ``[N, C]`` and, for a
    predictor of several members, their log-probabilities ``[S, N, C]``."""
    total = entropy(log_probs)
    expected = total if members is None else entropy(members).mean(0)
    return Uncertainty(total, expected, (total - expected).clamp_min(0.0), 2.0 * expected)


@dataclass
class PosteriorOutputs:
    """What a predictor says about a batch of inputs: the predictive probabilities ``[N, C]``, the per-input
    :class:`Uncertainty`, per class the credible interval ``lower``/``upper`` ``[N, C]`` (``None`` for one network)
    and the prediction sets ``[N, C]`` (``None`` without a calibrated threshold)."""

    probs: Tensor
    uncertainty: Uncertainty
    lower: Tensor | None
    upper: Tensor | None
    sets: Tensor | None


@torch.no_grad()
def posterior_outputs(predictor: nn.Module, x: Tensor, set_threshold: float | None = None,
                      level: float = 0.95) -> PosteriorOutputs:
    """Everything of the module docstring for the inputs ``x``: ``set_threshold`` is ``q̂`` of
    :func:`conformal_threshold` on the validation split (e.g. ``conformal_threshold(predict(predictor, val).log_probs,
    y_val, 0.95)``); ``level`` that of the credible intervals."""
    was_training = predictor.training
    predictor.eval()
    scores, members = predictor.outputs(x) if hasattr(predictor, "outputs") else (predictor(x), None)
    predictor.train(was_training)
    log_probs = F.log_softmax(scores, -1)
    lower, upper = credible_intervals(members, level) if members is not None else (None, None)
    sets = prediction_sets(log_probs, set_threshold) if set_threshold is not None else None
    return PosteriorOutputs(log_probs.exp(), uncertainty(log_probs, members), lower, upper, sets)


def credible_intervals(members: Tensor, level: float = 0.95) -> tuple[Tensor, Tensor]:
    """Equal-tailed credible intervals ``(lower, upper)`` ``[N, C]`` of each class probability over the members'
    probabilities (``members``: log-probabilities ``[S, N, C]``), at ``level``."""
    probs = members.exp()
    tail = (1.0 - level) / 2.0
    bounds = torch.quantile(probs, torch.tensor([tail, 1.0 - tail], dtype=probs.dtype, device=probs.device), dim=0)
    return bounds[0], bounds[1]


def conformal_threshold(log_probs: Tensor, y: Tensor, coverage: float = 0.95) -> float:
    """``q̂``: the ``⌈(n+1)·coverage⌉``-th smallest score ``1 − p_y`` of the calibration (validation) predictions;
    1 (every class in every set) when the calibration split is too small for the coverage."""
    scores = 1.0 - log_probs.exp().gather(1, y[:, None])[:, 0]
    n = len(scores)
    rank = math.ceil((n + 1) * coverage)
    if rank > n:
        return 1.0
    return float(scores.sort().values[rank - 1])


def prediction_sets(log_probs: Tensor, threshold: float) -> Tensor:
    """Boolean ``[N, C]``: class ``c`` is in input ``i``'s set when ``p_ic ≥ 1 − q̂`` (:func:`conformal_threshold`)."""
    return log_probs.exp() >= 1.0 - threshold


def kde_modes(members: Tensor, grid: int = KDE_GRID, chunk: int = 16) -> Tensor:
    """Per input and class, the mode over a ``grid``-point grid on [0, 1] of a Gaussian kernel density estimate of
    the members' probabilities (``members``: log-probabilities ``[S, N, C]``); ``[N, C]``, not renormalised.

    As ``scipy.stats.gaussian_kde`` with Scott's bandwidth ``σ̂ · S^(−1/5)`` (``σ̂`` the sample standard deviation,
    ``ddof = 1``), the estimator of MT-BKD's reference notebook (``AnonymousSub1/MTBKD``); when the members agree
    exactly (``σ̂ = 0``) the mode is their common value."""
    probs = members.exp().double()
    s = probs.shape[0]
    points = torch.linspace(0.0, 1.0, grid, dtype=probs.dtype, device=probs.device)
    modes = []
    for start in range(0, probs.shape[1], chunk):
        p = probs[:, start:start + chunk]  # [S, n, C]
        spread = p.std(0, unbiased=True) if s > 1 else torch.zeros_like(p[0])
        width = (spread * s ** (-0.2)).clamp_min(torch.finfo(p.dtype).tiny)  # [n, C]
        z = (points[:, None, None, None] - p[None]) / width[None, None]  # [G, S, n, C]
        density = torch.exp(-0.5 * z.square()).sum(1)  # [G, n, C] (the constant factor does not move the mode)
        mode = points[density.argmax(0)]
        modes.append(torch.where(spread > 0, mode, p[0]))
    return torch.cat(modes, 0).to(members.dtype)


def split_rhat(chains: Tensor) -> float:
    """Split R-hat of a scalar traced by ``K`` chains of ``S`` draws (``chains`` ``[K, S]``): each chain is cut in
    two halves, then ``R̂ = sqrt(((n−1)/n · W + B/n) / W)`` with ``W`` the mean within-half variance and ``B`` ``n``
    times the variance of the half means (Gelman et al., Bayesian Data Analysis, 3rd ed., §11.4). Values near 1
    mean the chains mix; above 1.01–1.1 they have not converged. NaN with fewer than 2 draws per half."""
    chains = chains.double()
    n = chains.shape[1] // 2
    if n < 2:
        return float("nan")
    halves = torch.cat([chains[:, :n], chains[:, -n:]], 0)  # [2K, n] (the middle draw of an odd chain is dropped)
    within = halves.var(1, unbiased=True).mean()
    between = n * halves.mean(1).var(unbiased=True)
    if within == 0:
        return 1.0 if between == 0 else float("inf")
    return float(torch.sqrt(((n - 1) / n * within + between / n) / within))
