"""Where a training step gets its frozen teachers' outputs from.

A :class:`TeacherSource` is asked for a batch *before* the student needs it (``request`` returns a callable that
waits for the result), so remote teachers compute the next batch while the student trains on this one.
:class:`LocalTeachers` runs the teachers in the training process; ``components.teacher_service.ActorTeachers``
asks Ray actors. Both give identical outputs for the same weights.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

from hpmkd.distill_batch import TeacherOutputs
from hpmkd.features import FeatureTaps

Pending = Callable[[], TeacherOutputs]


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
    """Frozen teachers evaluated in the calling process (plain PyTorch; also the reference for the actors)."""

    def __init__(self, names: list[str], models: list[nn.Module], device: torch.device | str = "cpu"):
        self.names = names
        self.models = [frozen(m).to(device) for m in models]
        self.device = device

    def request(self, x: Tensor, index: Tensor, taps: Sequence[Sequence[str]], view: int = 0) -> Pending:
        outs = [teacher_forward(m, x.to(self.device), taps[i] if taps else ()) for i, m in enumerate(self.models)]
        result = TeacherOutputs(torch.stack([o[0].float() for o in outs]), [o[1] for o in outs])
        return lambda: result
