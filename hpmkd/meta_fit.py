"""Fitting the Meta-MLP ensemble teacher's head (:mod:`hpmkd.models.meta_mlp`) on its base teachers' outputs.

Stacking (Wolpert 1992, "Stacked generalization") is only honest when the stacker is fitted on outputs of data the
base models did not train on: their outputs on their own training rows are over-confident. The head is therefore
fitted on the base teachers' logits on the *held-out* rows of the training split (:mod:`hpmkd.data.holdout`, rows
the teachers never trained on), by cross-entropy with Adam (decoupled weight decay, AdamW) in mini-batches, and the
epoch with the best accuracy on the validation split's outputs is selected (the first on ties), as every stage
selects. Inputs are the stacked outputs :func:`hpmkd.models.meta_mlp.stacked`; nothing here runs a teacher.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpmkd.config_schema import join
from hpmkd.registry import ConfigError


@dataclass
class MetaTrain:
    """How the head is fitted: ``epochs`` passes over the held-out rows in batches of ``batch_size``, AdamW with
    learning rate ``lr`` and ``weight_decay``."""

    epochs: int = 100
    lr: float = 0.003
    weight_decay: float = 1e-4
    batch_size: int = 256

    def check(self, path: str) -> None:
        for key in ("epochs", "lr", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{join(path, key)}: must be > 0, got {getattr(self, key)}.")
        if self.weight_decay < 0:
            raise ConfigError(f"{join(path, 'weight_decay')}: must be >= 0, got {self.weight_decay}.")


@dataclass
class HeadFit:
    """The selected head's weights, its epoch and validation metrics, and each epoch's metrics."""

    state: dict[str, Tensor]
    epoch: int
    val_acc: float
    val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


def accuracy_and_loss(head: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``head`` on stacked inputs ``x`` and labels ``y`` (eval mode)."""
    head.eval()
    with torch.no_grad():
        logits = head(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def fit_head(head: nn.Module, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], cfg: MetaTrain,
             seed: int) -> HeadFit:
    """Fit ``head`` on ``train = (stacked held-out outputs, labels)``; select on ``val`` (module docstring)."""
    x, y = train
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best: HeadFit | None = None
    history = []
    for epoch in range(cfg.epochs):
        head.train()
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), cfg.batch_size):
            rows = order[start:start + cfg.batch_size]
            loss = F.cross_entropy(head(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        val_acc, val_loss = accuracy_and_loss(head, *val)
        history.append({"epoch": float(epoch), "train_loss": total / len(y), "val_acc": val_acc, "val_loss": val_loss})
        if best is None or val_acc > best.val_acc:
            best = HeadFit(copy.deepcopy(head.state_dict()), epoch, val_acc, val_loss)
    best.history = history
    return best
