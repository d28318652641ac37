"""``meta_mlp``: HumP-KD's Meta-MLP ensemble teacher, a small network stacked on frozen base teachers' outputs.

    f(x) = head([s(z_1(x)); …; s(z_M(x))]),    s = softmax (``inputs: probs``) or the identity (``inputs: logits``)

``z_m`` are the base teachers' logits (their architectures are ``members``: ``[{model, options}, ...]``, built with
:func:`hpmkd.models.create_model`, frozen and always in eval mode); ``head`` is an MLP with ``depth`` hidden layers
of ``hidden`` units (``depth`` ≥ 1; ReLU, optional dropout). One state dict holds the members' weights and the
head's, so the ensemble is a torch model like any other: a ``model.pt`` predictor, served by the ``torch`` teacher
provider, cached by its digest. Its feature taps are empty (it has no spatial features; feature methods read the base teachers) and
its embedding is the head's last hidden layer.

Source: Mainuddin, Tabassum, Shahid, Khan, HumP-KD, arXiv 2606.14684 (abstract only: "Swin-Tiny, ViT-Base and their
Meta-MLP ensemble"); the stacked input, the head and how it is fitted (:mod:`hpmkd.meta_fit`, on rows the base
teachers did not train on) are our reconstruction.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.models.base import MODELS, check_positive

STACK_INPUTS = ("probs", "logits")


def stacked(member_logits: Tensor, inputs: str) -> Tensor:
    """``[s(z_1); …; s(z_M)]``, ``[B, M·C]``, from the members' logits ``[M, B, C]``."""
    values = F.softmax(member_logits, dim=-1) if inputs == "probs" else member_logits
    return values.permute(1, 0, 2).reshape(member_logits.shape[1], -1)


def meta_head(width: int, num_classes: int, hidden: int, depth: int, dropout: float) -> nn.Sequential:
    """``depth`` blocks Linear → ReLU (→ Dropout), then the classifier ``Linear(hidden, C)``."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width if i == 0 else hidden, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("meta_mlp")
class MetaMLP(nn.Module):
    """See the module docstring. ``members``: the base teachers' models, ``[{model: name, options: {...}}, ...]``."""

    def __init__(self, *, num_classes: int, in_channels: int, input_shape: tuple[int, ...] | None = None,
                 members: Sequence[dict[str, Any]] = (), hidden: int = 64, depth: int = 1,
                 inputs: Literal["probs", "logits"] = "probs", dropout: float = 0.0):
        super().__init__()
        from hpmkd.models.factory import create_model

        check_positive(num_classes=num_classes, in_channels=in_channels, hidden=hidden)
        if not members:
            raise ValueError("members: name the base teachers' models, e.g. [{model: cnn_small}, {model: mlp}].")
        if inputs not in STACK_INPUTS:
            raise ValueError(f"inputs must be one of {', '.join(STACK_INPUTS)}; got {inputs!r}.")
        if int(depth) != depth or depth < 1 or not 0 <= dropout < 1:
            raise ValueError(f"depth is an integer >= 1 and dropout in [0, 1); got depth={depth}, dropout={dropout}.")
        built = []
        for i, member in enumerate(members):
            if not isinstance(member, dict) or "model" not in member or set(member) - {"model", "options"}:
                raise ValueError(f"members.{i}: expected {{model: NAME, options: {{...}}}}, got {member!r}.")
            built.append(create_model(member["model"], num_classes=num_classes, in_channels=in_channels,
                                      input_shape=input_shape, **member.get("options", {})))
        self.members = nn.ModuleList(built).requires_grad_(False).eval()
        self.inputs = inputs
        self.head = meta_head(len(built) * num_classes, num_classes, int(hidden), int(depth), float(dropout))
        last = len(self.head) - 1
        self.taps = ModelTaps(feature_taps=(), embedding_tap=f"head.{last - 1}", classifier_tap=f"head.{last}")

    def train(self, mode: bool = True) -> "MetaMLP":
        super().train(mode)
        self.members.eval()  # the base teachers are frozen: their batch norms and dropouts never train
        return self

    def member_logits(self, x: Tensor) -> Tensor:
        """``[M, B, C]``."""
        with torch.no_grad():
            return torch.stack([m(x) for m in self.members])

    def forward(self, x: Tensor) -> Tensor:
        return self.head(stacked(self.member_logits(x), self.inputs))
