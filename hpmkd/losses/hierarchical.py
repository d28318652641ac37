"""HumP-KD's hierarchical feature distillation with a fused spatial attention mask.

[RECON] Every formula here is our reconstruction: the HumP-KD paper (Mainuddin, Tabassum, Shahid, Khan, arXiv
2606.14684) publishes only its abstract; its method section and code could not be retrieved, and the abstract only
says a "Hierarchical Feature Builder generates a fused spatial attention mask to guide distillation toward
discriminative regions". Every choice below is ours and is an option.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpmkd.distill_batch import DistillBatch, ModelTaps
from hpmkd.features import as_feature_map, conv1x1_adapter
from hpmkd.losses.base import LOSSES, DistillLoss, combine_teachers
from hpmkd.losses.layers import Layer, layer_pairs, student_feature, teacher_feature
from hpmkd.registry import ConfigError

RESIZE_MODES = ("bilinear", "bicubic", "nearest", "area")


def resize(feature: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """``feature`` resized to ``size`` with ``F.interpolate`` (unchanged when it already has that size)."""
    if tuple(feature.shape[2:]) == size:
        return feature
    corners = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(feature, size=size, mode=mode, **corners)


def spatial_attention(feature: Tensor) -> Tensor:
    """``A = a / max_hw a`` with ``a = mean_c F²``: a ``[B, H, W]`` map in ``[0, 1]`` (AT-style energy; dividing by the
    per-sample maximum rather than an L2 norm keeps it in [0, 1]: our choice)."""
    a = feature.pow(2).mean(1)
    return a / a.flatten(1).amax(1).clamp_min(torch.finfo(a.dtype).tiny)[:, None, None]


def top_k_mask(mask: Tensor, fraction: float) -> Tensor:
    """``1`` where a sample's mask reaches its ``k``-th largest value, ``k = ceil(fraction · H·W)`` (ties included),
    ``0`` elsewhere."""
    flat = mask.flatten(1)
    k = max(1, math.ceil(fraction * flat.shape[1]))
    kth = flat.topk(k, dim=1).values[:, -1:]
    return (flat >= kth).to(mask.dtype).view_as(mask)


def fused_mask(teacher_maps: Sequence[Sequence[Tensor]], weights: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """``M = Σ_m w_m · mean_l resize(A(F_T^{m,l}))``, ``[B, H, W]`` in ``[0, 1]``: attention of every level of every
    teacher at the resolution ``size``, averaged over levels and combined over teachers with the aggregator's
    per-sample weights, detached (our choice; the reconstruction allows mean or learned fusion).
    ``teacher_maps[m][l]`` is ``[B, C, H_l, W_l]``."""
    per_teacher = torch.stack(
        [
            torch.stack([resize(spatial_attention(f)[:, None], size, mode)[:, 0] for f in levels]).mean(0)
            for levels in teacher_maps
        ],
        dim=1,
    )  # [B, M, H, W]
    return (weights.detach()[:, :, None, None] * per_teacher).sum(1).clamp(0.0, 1.0)


def masked_distance(adapted: Tensor, target: Tensor, mask: Tensor, eps: float) -> Tensor:
    """``||M ⊙ (φ(F_S) − F_T)||² / (Σ_hw M + ε)`` per sample, ``[B]``, the mask broadcast over channels. As the
    reconstruction writes it, a soft mask enters squared (weights ``M²``); a binary ``top_k`` mask is unaffected."""
    return (mask[:, None] * (adapted - target)).pow(2).flatten(1).sum(1) / (mask.flatten(1).sum(1) + eps)


@LOSSES.register("hierarchical")
class Hierarchical(DistillLoss):
    """[RECON] ``L_HFD = (1/B) Σ_i Σ_m w_{i,m} Σ_l ||M_l ⊙ (φ_{l,m}(F_S^l) − F̃_T^{m,l})||²_i / (Σ M_l,i + ε)``.

    * ``pairs``: ``[[student_layer, teacher_layer], ...]`` (names or feature-tap indices); default the last
      ``min(#student, #teacher)`` feature taps paired in order.
    * ``F̃_T^{m,l}``: teacher ``m``'s map at level ``l`` resized to the student's resolution (``resize_mode``);
      token features ``[B, N, D]`` are laid out as square maps first.
    * ``φ_{l,m}``: a 1×1 convolution from the student's to teacher ``m``'s channels (one per level and teacher).
    * ``M_l`` (``mask: true``): :func:`fused_mask` at level ``l``'s resolution, optionally binarised to the top
      ``top_k`` fraction of positions (``top_k: null`` keeps the soft mask); ``mask: false`` uses ``M = 1``
      (plain multi-level feature matching, squared error summed over channels, averaged over positions).
    * ``m`` runs over the *feature teachers*: ``teachers`` (indices into the stage's teachers), by default every
      teacher that declares feature taps. A teacher without spatial features (the Meta-MLP ensemble, a stack on the
      others' outputs) takes part in the logit terms only; the aggregator's weights ``w`` are renormalised over the
      feature teachers (rows sum to 1) for the mask and the sum.
    Source: our reconstruction of HumP-KD (arXiv 2606.14684, abstract only). Term: ``hierarchical``.
    """

    def __init__(
        self,
        *,
        pairs: Sequence[Sequence[Layer]] | None = None,
        teachers: Sequence[int] | None = None,
        mask: bool = True,
        top_k: float | None = None,
        resize_mode: str = "bilinear",
        eps: float = 1e-6,
        **context: Any,
    ):
        super().__init__(**context)
        if top_k is not None and not 0 < top_k <= 1:
            raise ValueError(
                f"top_k is the fraction of positions kept, in (0, 1], or null for a soft mask; got {top_k}."
            )
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}; got {resize_mode!r}.")
        if eps <= 0:
            raise ValueError(f"eps must be > 0; got {eps}.")
        self.feature_teachers = feature_teachers(self.teacher_taps, teachers)
        self.pairs = layer_pairs(self.student_taps, [self.teacher_taps[m] for m in self.feature_teachers], pairs,
                                 "pairs")
        self.use_mask = bool(mask)
        self.top_k = top_k
        self.resize_mode = resize_mode
        self.eps = float(eps)
        self.adapters = nn.ModuleList()

    def student_tap_names(self) -> set[str]:
        return {s for s, _ in self.pairs}

    def teacher_tap_names(self) -> list[set[str]]:
        names: list[set[str]] = [set() for _ in range(self.num_teachers)]
        for j, m in enumerate(self.feature_teachers):
            names[m] = {ts[j] for _, ts in self.pairs}
        return names

    def teacher_maps(self, batch: DistillBatch) -> list[list[Tensor]]:
        """``[feature teacher j][level l]`` maps ``[B, C, H, W]``."""
        return [[as_feature_map(teacher_feature(batch, m, ts[j])) for _, ts in self.pairs]
                for j, m in enumerate(self.feature_teachers)]

    def weights(self, batch: DistillBatch) -> Tensor:
        """The aggregator's weights of the feature teachers, renormalised to rows summing to 1, ``[B, M_f]``."""
        w = batch.teacher_weights[:, self.feature_teachers]
        return w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)

    def setup(self, batch: DistillBatch) -> None:
        adapters = []
        maps = self.teacher_maps(batch)
        for level, (s, _) in enumerate(self.pairs):
            f_s = as_feature_map(student_feature(batch, s))
            per_teacher = [conv1x1_adapter(f_s.shape, levels[level].shape) for levels in maps]
            adapters.append(nn.ModuleList(per_teacher))
        self.adapters = nn.ModuleList(adapters).to(batch.student_logits.device)

    def level_mask(
        self, teacher_maps: list[list[Tensor]], weights: Tensor, size: tuple[int, int], like: Tensor
    ) -> Tensor:
        """``M_l`` at resolution ``size`` (ones when ``mask`` is off)."""
        if not self.use_mask:
            return torch.ones(like.shape[0], *size, dtype=like.dtype, device=like.device)
        m = fused_mask(teacher_maps, weights, size, self.resize_mode)
        return top_k_mask(m, self.top_k) if self.top_k is not None else m

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        teacher_maps = self.teacher_maps(batch)
        weights = self.weights(batch)
        per_level = []  # [B, M_f] per level
        for level, (s, _) in enumerate(self.pairs):
            f_s = as_feature_map(student_feature(batch, s))
            size = (f_s.shape[2], f_s.shape[3])
            mask = self.level_mask(teacher_maps, weights, size, f_s)
            targets = [resize(levels[level], size, self.resize_mode) for levels in teacher_maps]
            per_level.append(
                torch.stack(
                    [
                        masked_distance(adapter(f_s), target, mask, self.eps)
                        for adapter, target in zip(self.adapters[level], targets)
                    ],
                    dim=1,
                )
            )
        return {"hierarchical": combine_teachers(torch.stack(per_level).sum(0), weights)}


def feature_teachers(taps: Sequence[ModelTaps], chosen: Sequence[int] | None) -> list[int]:
    """The indices of the teachers whose features the loss reads: ``chosen``, or every teacher with feature taps."""
    if chosen is None:
        found = [m for m, t in enumerate(taps) if t.feature_taps]
        if not found:
            raise ConfigError("teachers: no teacher of this stage declares feature taps; the hierarchical loss needs "
                              "at least one with spatial features (a CNN or a transformer).")
        return found
    for m in chosen:
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < len(taps):
            raise ConfigError(f"teachers: {m!r} is not a teacher index in 0..{len(taps) - 1}.")
    if not chosen:
        raise ConfigError("teachers: name at least one teacher index (or null for every teacher with features).")
    return list(dict.fromkeys(chosen))
