"""Multi-teacher aggregators: per-sample teacher weights ``w [B, M]`` and how the teachers are mixed.

An aggregator sees the frozen teachers' logits ``z [M, B, C]``, the labels, the input and the student's logits, and
returns an :class:`AggregateOut`: weights whose rows sum to 1, plus optional extra loss terms. Its class attribute
``mix`` tells the KD methods how to use the weights (see :data:`hpmkd.distill_batch.Mix` and
:mod:`hpmkd.losses.mixing`):

* ``logits``: target ``σ(Σ_m w_m z_m / T)``;  ``probs``: target ``Σ_m w_m σ(z_m / T)``;
* ``loss``: the method's loss is ``Σ_m w_m ℓ(teacher m)``.

Every aggregator is built as ``AGGREGATORS.build(name, options, num_teachers=M, num_classes=C, input_shape=shape)``.
With a single teacher every aggregator returns weights of ones and no terms (there is nothing to weigh).

Sources: MT-BKD entropy weights (Fang, Chen, Cai, Ma, Zhong, arXiv 2605.27967; reference code
``AnonymousSub1/MTBKD``, ``loss_fn_kd_mix_weighted``); HPM-KD attention (Haase & Dourado da Silva, arXiv 2512.09886;
authors' draft ``guhaase/papers-deepbridge`` ``01_HPM-KD_Framework/POR/sections/04-methodology.tex``); HumP-KD
(Mainuddin, Tabassum, Shahid, Khan, arXiv 2606.14684; only the abstract is public, so its formulas here are our
reconstruction); CA-MKD (Zhang, Chen, Wang, ICASSP 2022, arXiv 2201.00007, ``Rorozhl/CA-MKD``); AVER / EBKD (the
multi-teacher baselines in ``Rorozhl/CA-MKD``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpmkd.distill_batch import Mix
from hpmkd.registry import Registry


@dataclass
class AggregateOut:
    """What an aggregator returns for one batch.

    ``weights``: ``[B, M]``, each row sums to 1; detached unless the aggregator learns them (``attention``).
    ``terms``: extra named loss terms the aggregator wants added to the objective, already multiplied by the
    coefficient the aggregator's own options give them (the distiller adds them unweighted).
    ``confidence``: optional per-sample scale ``[B]`` in ``(0, 1]`` for the KD loss (HumP-KD's consensus
    confidence, see :class:`VarianceWeights`), detached; ``None`` means 1 for every sample. It is not folded into
    ``weights`` because the rows of ``weights`` must sum to 1 for the ``probs`` mix to give a distribution.
    """

    weights: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    confidence: Tensor | None = None


class Aggregator(nn.Module, ABC):
    """Base class: checks the shapes, handles the single-teacher case, and delegates to :meth:`weigh`.

    ``num_teachers``, ``num_classes`` and ``input_shape`` (one sample's shape, no batch dimension) are supplied by
    hpmkd; subclasses add their user options as keyword arguments with defaults.
    """

    mix: ClassVar[Mix]

    def __init__(self, *, num_teachers: int, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__()
        if int(num_teachers) < 1:
            raise ValueError(f"an aggregator needs at least one teacher, got num_teachers={num_teachers}.")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.num_teachers = int(num_teachers)
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(d) for d in input_shape)

    def forward(
        self, teacher_logits: Tensor, y: Tensor, x: Tensor, student_logits: Tensor, temperature: Tensor
    ) -> AggregateOut:
        """Weights ``[B, M]`` for teacher logits ``[M, B, C]``, labels ``[B]``, input ``x [B, ...]``, student logits
        ``[B, C]`` and the step's temperature (0-dim tensor)."""
        self.check_shapes(teacher_logits, y)
        m, b, _ = teacher_logits.shape
        if m == 1:
            return AggregateOut(torch.ones(b, 1, dtype=teacher_logits.dtype, device=teacher_logits.device))
        return self.weigh(teacher_logits, y, x, student_logits, temperature)

    @abstractmethod
    def weigh(
        self, teacher_logits: Tensor, y: Tensor, x: Tensor, student_logits: Tensor, temperature: Tensor
    ) -> AggregateOut:
        """The weights for ``M >= 2`` teachers (same arguments as :meth:`forward`)."""

    def check_shapes(self, teacher_logits: Tensor, y: Tensor) -> None:
        if teacher_logits.dim() != 3:
            raise ValueError(
                f"{type(self).__name__}: teacher logits must be [M, B, C]; got shape {tuple(teacher_logits.shape)}. "
                f"Stack the teachers' [B, C] logits along a new first dimension."
            )
        m, b, c = teacher_logits.shape
        if m != self.num_teachers or c != self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: built for {self.num_teachers} teachers and {self.num_classes} classes, "
                f"got teacher logits [M={m}, B={b}, C={c}]. Build the aggregator with the stage's teachers."
            )
        if tuple(y.shape) != (b,):
            raise ValueError(f"{type(self).__name__}: labels must be [B] = [{b}]; got shape {tuple(y.shape)}.")


def positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value}.")
    return value


def non_negative(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return value


def uniform(teacher_logits: Tensor) -> Tensor:
    """``[B, M]`` weights ``1 / M``."""
    m, b, _ = teacher_logits.shape
    return torch.full((b, m), 1.0 / m, dtype=teacher_logits.dtype, device=teacher_logits.device)


AGGREGATORS: Registry[Aggregator] = Registry("aggregator", context=("num_teachers", "num_classes", "input_shape"))


class Uniform(Aggregator):
    """``w_m = 1 / M`` for every sample; the subclasses differ only in ``mix``."""

    def weigh(self, teacher_logits, y, x, student_logits, temperature) -> AggregateOut:
        return AggregateOut(uniform(teacher_logits))


@AGGREGATORS.register("mean_logits")
class MeanLogits(Uniform):
    """Average of the teachers' logits, target ``σ((1/M) Σ_m z_m / T)`` (the logit mixing we use for HPM-KD's
    attention ensemble, arXiv 2512.09886, here with uniform weights)."""

    mix = "logits"


@AGGREGATORS.register("mean_probs")
class MeanProbs(Uniform):
    """Average of the teachers' soft labels, target ``(1/M) Σ_m σ(z_m / T)`` (the common alternative to AVER's
    averaged losses in ``Rorozhl/CA-MKD``; the tabular health-data distillation paper, arXiv 2605.18702, averages
    teacher probabilities)."""

    mix = "probs"


@AGGREGATORS.register("mean_loss")
class MeanLoss(Uniform):
    """AVER: the average of the per-teacher KD losses, ``(1/M) Σ_m ℓ(teacher m)`` (``AVERAGE_LOSS`` in the CA-MKD
    repository ``Rorozhl/CA-MKD``; Zhang, Chen, Wang, ICASSP 2022)."""

    mix = "loss"


@AGGREGATORS.register("entropy")
class EntropyWeights(Aggregator):
    """EBKD / MT-BKD entropy weights, per sample and detached (MT-BKD, Fang et al., arXiv 2605.27967, reference code
    ``AnonymousSub1/MTBKD`` ``loss_fn_kd_mix_weighted``; EBKD in the CA-MKD repository ``Rorozhl/CA-MKD``)::

        q_m = σ(z_m)  (T = 1);   H_m = −Σ_c q_m,c log q_m,c
        w̃_m = 1 − H_m / Σ_j H_j;   w_m = w̃_m / Σ_j w̃_j   (= w̃_m / (M − 1))

    Lower entropy (a more confident teacher) gives a larger weight. The log base cancels in ``H_m / Σ_j H_j``
    (MT-BKD uses bits, EBKD nats). When every teacher is one-hot (``Σ_j H_j = 0``) the weights are uniform.
    """

    mix = "loss"

    def weigh(self, teacher_logits, y, x, student_logits, temperature) -> AggregateOut:
        return AggregateOut(entropy_weights(teacher_logits))


def entropy_weights(teacher_logits: Tensor) -> Tensor:
    """The entropy weights of :class:`EntropyWeights`, ``[B, M]``, detached; ones for a single teacher."""
    m, b, _ = teacher_logits.shape
    if m == 1:
        return torch.ones(b, 1, dtype=teacher_logits.dtype, device=teacher_logits.device)
    with torch.no_grad():
        log_q = F.log_softmax(teacher_logits.detach(), dim=-1)
        entropy = -(log_q.exp() * log_q).sum(-1)  # [M, B]
        total = entropy.sum(0, keepdim=True).clamp_min(torch.finfo(entropy.dtype).tiny)
        raw = 1.0 - entropy / total
        return (raw / raw.sum(0, keepdim=True)).t()


@AGGREGATORS.register("confidence")
class ConfidenceWeights(Aggregator):
    """CA-MKD confidence weights, per sample and detached (Zhang, Chen, Wang, ICASSP 2022, arXiv 2201.00007;
    ``Rorozhl/CA-MKD`` ``helper/loops.py``)::

        ℓ_k = CE(z_k, y)   (T = 1);    w_k = (1 − softmax_k(ℓ_·)) / (K − 1)

    A teacher whose prediction is closer to the one-hot label (smaller cross-entropy) gets a larger weight.
    """

    mix = "loss"

    def weigh(self, teacher_logits, y, x, student_logits, temperature) -> AggregateOut:
        m, b, _ = teacher_logits.shape
        with torch.no_grad():
            log_q = F.log_softmax(teacher_logits.detach(), dim=-1)
            ce = -log_q.gather(-1, y.view(1, b, 1).expand(m, b, 1)).squeeze(-1)  # [M, B]
            weights = (1.0 - F.softmax(ce, dim=0)) / (m - 1)
        return AggregateOut(weights.t())


@AGGREGATORS.register("variance")
class VarianceWeights(Aggregator):
    """HumP-KD uncertainty weighting from inter-teacher prediction variance. **Our reconstruction** (Mainuddin,
    Tabassum, Shahid, Khan, arXiv 2606.14684, publish only the abstract: the paper's text and code were not
    available; every formula here is our choice)::

        q_m = σ(z_m / τ);   q̄ = (1/M) Σ_m q_m;   u_m = ||q_m − q̄||²    (deviation from the consensus)
        a_m = softmax_m(−u_m / κ)                                          (target q* = Σ_m a_m q_m, mix = probs)
        v = (1/M) Σ_m u_m;   c = exp(−v / ν)                               (per-sample consensus confidence)

    The teacher nearest the consensus gets the largest weight. The weights are detached (a weighting heuristic,
    not learned: our choice). ``c`` is returned as :attr:`AggregateOut.confidence` (``[B]``, detached, in
    ``(0, 1]``); the distiller hands it to the KD methods (:attr:`hpmkd.distill_batch.DistillBatch.confidence`) and
    ``kd`` scales each sample's term by it, which makes ``L_UKD = τ² · mean_i c_i · KL(q*_i || σ(z_S,i / τ))``. It is
    not mixed into the weights, whose rows must sum to 1.

    Options: ``kappa`` (κ, default 0.1), ``nu`` (ν, default 0.1), ``tau`` (τ; ``None``, the default, uses the
    step's temperature, our choice).
    """

    mix = "probs"

    def __init__(
        self,
        *,
        num_teachers: int,
        num_classes: int,
        input_shape: tuple[int, ...],
        kappa: float = 0.1,
        nu: float = 0.1,
        tau: float | None = None,
    ):
        super().__init__(num_teachers=num_teachers, num_classes=num_classes, input_shape=input_shape)
        self.kappa = positive("kappa", kappa)
        self.nu = positive("nu", nu)
        self.tau = None if tau is None else positive("tau", tau)

    def weigh(self, teacher_logits, y, x, student_logits, temperature) -> AggregateOut:
        with torch.no_grad():
            tau = temperature.detach() if self.tau is None else self.tau
            q = F.softmax(teacher_logits.detach() / tau, dim=-1)  # [M, B, C]
            deviation = (q - q.mean(0, keepdim=True)).pow(2).sum(-1)  # u_m, [M, B]
            weights = F.softmax(-deviation / self.kappa, dim=0)
            confidence = torch.exp(-deviation.mean(0) / self.nu)  # c, [B]
        return AggregateOut(weights.t(), confidence=confidence)


def input_features(x: Tensor, pool_size: int) -> Tensor:
    """``φ(x)``: an image ``[B, C, H, W]`` adaptive-average-pooled to ``pool_size × pool_size`` and flattened;
    any other input (a tabular vector) flattened as it is."""
    if x.dim() == 4:
        x = F.adaptive_avg_pool2d(x, pool_size)
    return x.flatten(1)


def feature_size(input_shape: tuple[int, ...], pool_size: int) -> int:
    """The length of :func:`input_features` for one sample of ``input_shape``."""
    if len(input_shape) == 3:
        return input_shape[0] * pool_size * pool_size
    return math.prod(input_shape)


@AGGREGATORS.register("attention")
class AttentionWeights(Aggregator):
    """HPM-KD attention-weighted multi-teacher ensemble (AWMT; Haase & Dourado da Silva, arXiv 2512.09886;
    equations from the authors' draft, ``guhaase/papers-deepbridge``
    ``01_HPM-KD_Framework/POR/sections/04-methodology.tex``)::

        h    = MLP1([φ(x); t_1; …; t_M; q_1; …; q_M])      (t_m learned teacher embeddings)
        a(x) = softmax_m(MLP2(h))                          (per-sample weights, mix = logits:
                                                             target σ(Σ_m a_m z_m / T))
        attn_entropy = β · (−(1/B) Σ_i H(a(x_i))),   H(a) = −Σ_m a_m log a_m
        attn_label   = λ · CE(Σ_m a_m z_m, y)

    The network is trained jointly with the student through these terms (returned already multiplied by β and λ; a
    term whose coefficient is 0 is left out). The weights the KD methods see are **detached** by default
    (``learn_from_kd: false``, our choice): the draft lets the KD loss train them too (``learn_from_kd: true``), but the
    gradient of ``KL(target || student)`` with respect to ``a`` only moves the target toward the student. On
    Fashion-MNIST (docs/results.md) that collapsed the weights onto whichever model was most like the student (the
    assistant, in the student's link) and the distilled student fell below the student trained alone.

    The paper's parts: ``φ(x)`` (an image is adaptive-average-pooled to ``pool_size × pool_size``; a vector is used
    as it is), the embeddings ``t_m``, two 2-layer ReLU MLPs with ``hidden`` units and ``dropout`` (128 and 0.2 in
    the paper's experiments), the entropy regulariser (β is not given in the paper; default 0.01 is our choice).
    Our choices, each an option: the teachers' softened probabilities ``q_m = σ(z_m / T)`` (T detached) as extra
    input (``use_teacher_probs``); the label term ``attn_label`` (``label_weight`` λ, default 1.0) so the weights
    also learn which teacher is right: the KD loss alone only pulls the target toward the student
    (``label_weight: 0`` with ``learn_from_kd: true`` gives the paper's pure form); mixing logits rather than
    probabilities (the draft is ambiguous, writing both; logits are our reading).
    """

    mix = "logits"

    def __init__(
        self,
        *,
        num_teachers: int,
        num_classes: int,
        input_shape: tuple[int, ...],
        hidden: int = 128,
        dropout: float = 0.2,
        embed_dim: int = 16,
        pool_size: int = 4,
        use_teacher_probs: bool = True,
        beta: float = 0.01,
        label_weight: float = 1.0,
        learn_from_kd: bool = False,
    ):
        super().__init__(num_teachers=num_teachers, num_classes=num_classes, input_shape=input_shape)
        for name, value in (("hidden", hidden), ("embed_dim", embed_dim), ("pool_size", pool_size)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if len(self.input_shape) == 0:
            raise ValueError("input_shape must describe one sample, e.g. (3, 32, 32) or (20,); got ().")
        self.pool_size = int(pool_size)
        self.use_teacher_probs = bool(use_teacher_probs)
        self.beta = non_negative("beta", beta)
        self.label_weight = non_negative("label_weight", label_weight)
        self.learn_from_kd = bool(learn_from_kd)
        if not self.learn_from_kd and self.beta == 0 and self.label_weight == 0:
            raise ValueError(
                "attention aggregator: with learn_from_kd false and beta = label_weight = 0 nothing trains the weights. "
                "Set label_weight > 0 (the default 1.0), or learn_from_kd: true for the paper's pure form."
            )
        m = self.num_teachers
        self.embeddings = nn.Parameter(0.1 * torch.randn(m, int(embed_dim)))
        width = feature_size(self.input_shape, self.pool_size) + m * int(embed_dim)
        if self.use_teacher_probs:
            width += m * self.num_classes
        hidden = int(hidden)
        self.encoder = nn.Sequential(  # MLP1
            nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.scorer = nn.Sequential(  # MLP2
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, m)
        )

    def weigh(self, teacher_logits, y, x, student_logits, temperature) -> AggregateOut:
        m, b, _ = teacher_logits.shape
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"attention aggregator: built for inputs of shape {self.input_shape}, got {tuple(x.shape[1:])}. "
                f"Pass the stage's input_shape when building it."
            )
        parts = [input_features(x, self.pool_size).to(self.embeddings.dtype), self.embeddings.flatten().expand(b, -1)]
        if self.use_teacher_probs:
            q = F.softmax(teacher_logits.detach() / temperature.detach(), dim=-1)  # [M, B, C]
            parts.append(q.transpose(0, 1).reshape(b, -1))
        scores = self.scorer(self.encoder(torch.cat(parts, dim=1)))  # [B, M]
        weights = F.softmax(scores, dim=1)
        terms: dict[str, Tensor] = {}
        if self.beta > 0:
            log_a = F.log_softmax(scores, dim=1)
            entropy = -(weights * log_a).sum(1)
            terms["attn_entropy"] = self.beta * (-entropy.mean())
        if self.label_weight > 0:
            mixed = torch.einsum("bm,mbc->bc", weights, teacher_logits.detach())
            terms["attn_label"] = self.label_weight * F.cross_entropy(mixed, y)
        return AggregateOut(weights if self.learn_from_kd else weights.detach(), terms)
