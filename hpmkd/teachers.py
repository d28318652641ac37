"""Teachers: what a teacher is (a provider), and where a training step gets the teachers' outputs from (a source).

**Providers.** A teacher is anything that, given a batch, returns logits and, if asked, named features
(:class:`TeacherProvider`). :data:`PROVIDERS` holds the kinds of teacher hpmkd can host, each able to say which model
references it serves (:meth:`TeacherProvider.serves`), to read its weights file safely in the driver
(:meth:`TeacherProvider.read`), where its features are (``taps``) and how large it is before training (``size``,
``None`` when unknown), and to be built from those weights wherever it runs (an actor, a worker, a test):
``torch`` (:class:`TorchTeacher`) serves every :func:`hpmkd.models.create_model` name, trained here or given as a
checkpoint; ``sklearn`` (:mod:`hpmkd.estimator_teacher`) serves fitted scikit-learn and boosting
estimators. :func:`provider_for`
finds the provider of a :class:`~hpmkd.models.ref.ModelRef`.

**Sources.** A :class:`TeacherSource` is asked for a batch *before* the student needs it (``request`` returns a
callable that waits for the result), so remote teachers compute the next batch while the student trains on this
one. :class:`LocalTeachers` runs providers in the training process; :class:`hpmkd.components.teacher_service.ActorTeachers`
asks Ray actors, :class:`hpmkd.components.logit_cache.CachedTeachers` reads stored outputs. All give identical
outputs for the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, Sequence

import torch
from torch import Tensor, nn

from hpmkd.distill_batch import ModelTaps, TeacherOutputs
from hpmkd.features import FeatureTaps
from hpmkd.models import is_model
from hpmkd.models.ref import DataShape, ModelRef
from hpmkd.predictors import Ensemble, SingleModel, WeightSamples, predictor_from_payload, read_predictor_payload
from hpmkd.registry import ConfigError, Registry

if TYPE_CHECKING:
    from hpmkd.config import DistillConfig

Pending = Callable[[], TeacherOutputs]


@dataclass(frozen=True)
class TeacherSpec:
    """What builds a teacher anywhere: its name, its model and the data shape it serves."""

    name: str
    model: ModelRef
    shape: DataShape


class TeacherProvider(Protocol):
    """A frozen teacher: :meth:`forward` gives a batch's logits ``[B, C]`` and the outputs of the named taps."""

    def forward(self, x: Tensor, taps: Sequence[str] = ()) -> tuple[Tensor, dict[str, Tensor]]: ...

    def to(self, device: torch.device | str) -> "TeacherProvider": ...


PROVIDERS: Registry[TeacherProvider] = Registry("teacher provider")


@PROVIDERS.register("torch")
class TorchTeacher:
    """A PyTorch predictor (:mod:`hpmkd.predictors`) of a :func:`hpmkd.models.create_model` architecture, trained here
    or given as a checkpoint: one model (its logits, and the named features a method asks for), or a set of weight
    samples or an ensemble (their predictive log-probabilities; no features)."""

    kind: ClassVar[str] = "torch"

    def __init__(self, model: nn.Module):
        self.model = frozen(model.model if isinstance(model, SingleModel) else model)

    @staticmethod
    def serves(ref: ModelRef) -> bool:
        return is_model(ref.model)

    @staticmethod
    def taps(ref: ModelRef, shape: DataShape) -> ModelTaps:
        return ref.taps(shape)

    @staticmethod
    def size(ref: ModelRef, shape: DataShape) -> int | None:
        return ref.count_params(shape)

    @staticmethod
    def read(path: str) -> Any:
        """The predictor payload in ``path`` (``torch.load(weights_only=True)``; a ``model.pt`` or ``state.pt``)."""
        return read_predictor_payload(path)

    @classmethod
    def build(cls, spec: TeacherSpec, payload: Any) -> "TorchTeacher":
        """The teacher from the payload :meth:`read` returned; a mismatch names the first layer that does not fit."""
        return cls(predictor_from_payload(spec.model, spec.shape, payload))

    def forward(self, x: Tensor, taps: Sequence[str] = ()) -> tuple[Tensor, dict[str, Tensor]]:
        if taps and isinstance(self.model, (WeightSamples, Ensemble)):
            raise ValueError(f"a {type(self.model).__name__} teacher serves predictions only, not the features "
                             f"{list(taps)}; use a single-model teacher for feature methods.")
        return teacher_forward(self.model, x, taps)

    def to(self, device: torch.device | str) -> "TorchTeacher":
        self.model.to(device)
        return self


def provider_for(ref: ModelRef, path: str = "model") -> Any:
    """The provider class that serves ``ref``; a :class:`ConfigError` naming ``path`` when none does."""
    from hpmkd.config import load_plugins  # providers registered by plugin modules (in a fresh actor process too)

    load_plugins()
    for name in PROVIDERS.names():
        provider = PROVIDERS.get(name)
        if provider.serves(ref):
            return provider
    raise ConfigError(f"{path}: no teacher provider serves model {ref.model!r} (providers: "
                      f"{', '.join(PROVIDERS.names())}). See `hpmkd models` for the names hpmkd can build.")


def teacher_taps(ref: ModelRef, shape: DataShape) -> ModelTaps:
    """Where a teacher's features are (a provider without features gives empty taps)."""
    return provider_for(ref).taps(ref, shape)


def teacher_size(ref: ModelRef, shape: DataShape) -> int | None:
    """A teacher's parameter count before it is trained; ``None`` when only the fitted model knows it (an
    estimator)."""
    return provider_for(ref).size(ref, shape)


def load_teacher(spec: TeacherSpec, path: str) -> TeacherProvider:
    """The teacher ``spec`` with the weights in ``path``, built in this process."""
    provider = provider_for(spec.model)
    return provider.build(spec, provider.read(path))


class TeacherSource(Protocol):
    names: list[str]

    def request(self, x: Tensor, index: Tensor, taps: Sequence[Sequence[str]], view: int = 0) -> Pending:
        """Start computing the teachers' outputs for ``x`` (rows ``index`` of the training split); the returned
        callable gives them. ``view``: which stored view ``x`` is (a view bank's ``epoch mod N``, 0 otherwise);
        sources that compute on ``x`` itself ignore it."""


def frozen(model: nn.Module) -> nn.Module:
    """Evaluation mode, no gradients: how every teacher is used."""
    model.eval()
    model.requires_grad_(False)
    return model


@torch.inference_mode()
def teacher_forward(model: nn.Module, x: Tensor, taps: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """One frozen teacher's logits and the outputs of the named modules ``taps``."""
    if not taps:
        return model(x), {}
    with FeatureTaps(model, list(taps)).capture() as feats:
        logits = model(x)
    return logits, dict(feats)


class LocalTeachers:
    """Frozen teachers evaluated in the calling process (also the reference for the actors): providers, or plain
    PyTorch models (hosted as :class:`TorchTeacher`)."""

    def __init__(self, names: list[str], teachers: list[TeacherProvider | nn.Module],
                 device: torch.device | str = "cpu"):
        self.names = names
        self.teachers = [(TorchTeacher(t) if isinstance(t, nn.Module) else t).to(device) for t in teachers]
        self.device = device

    def request(self, x: Tensor, index: Tensor, taps: Sequence[Sequence[str]], view: int = 0) -> Pending:
        outs = [t.forward(x.to(self.device), taps[i] if taps else ()) for i, t in enumerate(self.teachers)]
        result = TeacherOutputs(torch.stack([o[0].float() for o in outs]), [o[1] for o in outs])
        return lambda: result


def choose_source(distill: DistillConfig, augment: str, needs_features: bool) -> str:
    """``distill.teacher_outputs`` resolved; ``auto`` is the fastest source that is exact.

    Stored outputs (``cache``, ``bank``; :mod:`hpmkd.components.teacher_outputs`) skip the teachers' forward passes
    during training, so they win whenever they serve exactly the view the student sees: ``cache`` when the input is
    not randomly augmented; ``bank`` when it is and the user asked for a bank (``bank_views``: replaying N views
    changes the training distribution, so it is never imposed); ``online`` otherwise. A method that reads teacher
    features can be served from storage only where ``distill.cache_features`` asks for it (feature maps can be
    large: ``rows × prod(feature shape) × 2`` bytes per teacher and view in float16).
    """
    choice = distill.teacher_outputs
    storable = not needs_features or distill.cache_features
    if choice in ("cache", "bank") and not storable:
        raise ConfigError(f"distill.teacher_outputs: {choice!r} stores logits only, but a method in distill.methods "
                          "reads teacher features. Set distill.cache_features: true to store them too, or use "
                          "teacher_outputs: online (or auto).")
    if choice != "auto":
        return choice
    if not storable:
        return "online"
    if augment == "none":
        return "cache"
    return "bank" if distill.bank_views else "online"
