"""Robustness test metrics: the selected predictor on corrupted copies of the test split, as HumP-KD evaluates its
fire classifiers under Gaussian noise and motion blur (Mainuddin et al., arXiv 2606.14684; the abstract names the
corruptions, not their severities: the three fixed severities below are our choice).

Corruptions act on the model inputs (already normalised per channel), one registered function each in
:data:`CORRUPTIONS` (``(x [B, C, H, W], rows [B], severity) -> x'``):

* ``gaussian_noise``: ``x' = x + σ·ε``, ``ε ~ N(0, 1)`` per pixel, ``σ ∈ {0.25, 0.5, 1.0}`` in units of the
  per-channel standard deviation (on Fashion-MNIST, std 0.353, that is 0.09, 0.18, 0.35 of the pixel range, close to
  ImageNet-C's severities 1, 3 and 5). The noise of row ``r`` is drawn from a generator seeded with ``r``, so every
  model sees the same noisy images whatever its batch size.
* ``motion_blur``: a horizontal box kernel of odd length ``L = max(3, ⌊f·W⌋ | 1)`` for ``f ∈ {0.08, 0.16, 0.24}``
  of the image width (3, 5, 7 pixels at 28 px; 17, 35, 53 at 224 px), replicate padding. Blurring commutes with the
  per-channel normalisation (the kernel sums to 1), so it equals blurring the raw pixels.

For each corruption and severity ``s`` (1..3) the metric records ``<corruption>_<s>_acc`` and
``<corruption>_<s>_macro_f1``, and ``<corruption>_macro_f1``, the mean over severities (all as ``test_...``). Tabular
inputs are not corrupted (the metric gives nothing).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpmkd.data.source import BatchSource
from hpmkd.evaluation import METRICS, Predictions
from hpmkd.f1 import macro_f1
from hpmkd.registry import Registry

#: name -> ``(x, rows, severity) -> corrupted x``
CORRUPTIONS: Registry[Tensor] = Registry("corruption")
#: the severities of each corruption, level 1..3
SEVERITIES: dict[str, tuple[float, ...]] = {"gaussian_noise": (0.25, 0.5, 1.0), "motion_blur": (0.08, 0.16, 0.24)}


@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(x: Tensor, rows: Tensor, sigma: float) -> Tensor:
    noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(r))) for r in rows])
    return x + sigma * noise.to(x.device, x.dtype)


def blur_length(width: int, fraction: float) -> int:
    """``max(3, ⌊fraction · width⌋ | 1)``: an odd kernel length."""
    return max(3, int(fraction * width) | 1)


@CORRUPTIONS.register("motion_blur")
def motion_blur(x: Tensor, rows: Tensor, fraction: float) -> Tensor:
    length = blur_length(x.shape[-1], fraction)
    channels = x.shape[1]
    kernel = torch.full((channels, 1, 1, length), 1.0 / length, dtype=x.dtype, device=x.device)
    padded = F.pad(x, (length // 2, length // 2, 0, 0), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels)


@torch.no_grad()
def corrupted_predictions(predictor: nn.Module, split: BatchSource, corrupt: Callable[[Tensor, Tensor], Tensor],
                          batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(predicted classes, labels)`` of ``predictor`` over ``split`` with every batch corrupted first."""
    was_training = predictor.training
    predictor.eval()
    predicted, labels = [], []
    for x, y, rows in split.batches(batch_size, shuffle=False):
        predicted.append(predictor(corrupt(x.to(device), rows)).argmax(1).cpu())
        labels.append(y)
    predictor.train(was_training)
    return torch.cat(predicted), torch.cat(labels)


@METRICS.register("corruptions")
def corruptions(predictions: Predictions, predictor: nn.Module | None, split: BatchSource | None, batch_size: int,
                device: torch.device) -> dict[str, float]:
    """Accuracy and macro-F1 under every corruption and severity (module docstring)."""
    if predictor is None or split is None or len(split) == 0 or split.rows(torch.arange(1))[0].dim() != 4:
        return {}
    out: dict[str, float] = {}
    for name in CORRUPTIONS.names():
        corrupt = CORRUPTIONS.get(name)
        f1s = []
        for level, severity in enumerate(SEVERITIES[name], start=1):
            predicted, labels = corrupted_predictions(
                predictor, split, lambda x, rows: corrupt(x, rows, severity), batch_size, device)
            f1s.append(macro_f1(predicted, labels, predictions.num_classes))
            out[f"{name}_{level}_acc"] = float((predicted == labels).float().mean())
            out[f"{name}_{level}_macro_f1"] = f1s[-1]
        out[f"{name}_macro_f1"] = sum(f1s) / len(f1s)
    return out
