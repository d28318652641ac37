"""Contrastive representation distillation (Tian, Krishnan, Isola, ICLR 2020), as mdistiller
``mdistiller/distillers/CRD.py`` (``Embed``, ``ContrastMemory``, ``ContrastLoss``)."""

from __future__ import annotations

from typing import Any
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpmkd.distill_batch import DistillBatch
from hpmkd.features import linear_adapter
from hpmkd.losses.base import LOSSES, DistillLoss, combine_teachers
from hpmkd.losses.layers import embedding, student_feature, teacher_feature


class ContrastMemory(nn.Module):
    """Two memory banks of L2-normalised embeddings, one row per training sample: ``memory_s`` (student) and
    ``memory_t`` (teacher), initialised uniformly in ``±1/sqrt(d/3)`` and updated with momentum
    ``v_i ← normalize(m · v_i + (1 − m) · e_i)``. Scores ``P(i | e) = exp(e · v_i / τ) / Z`` with ``Z``
    estimated once (``Z = mean(exp(e · v / τ)) · N``) by :meth:`estimate_z` at the first batch; kept as a buffer,
    so it is checkpointed."""

    def __init__(self, feat_dim: int, num_train: int, nce_t: float, momentum: float):
        super().__init__()
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.nce_t = nce_t
        self.momentum = momentum
        self.register_buffer("memory_s", torch.rand(num_train, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(num_train, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))

    def raw_scores(self, e_s: Tensor, e_t: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """``exp(e_S · V_T[idx] / τ)`` and ``exp(e_T · V_S[idx] / τ)``, each ``[B, K + 1]``."""
        out_s = torch.exp(torch.bmm(self.memory_t[idx], e_s[:, :, None])[:, :, 0] / self.nce_t)
        out_t = torch.exp(torch.bmm(self.memory_s[idx], e_t[:, :, None])[:, :, 0] / self.nce_t)
        return out_s, out_t

    @torch.no_grad()
    def estimate_z(self, e_s: Tensor, e_t: Tensor, idx: Tensor) -> None:
        out_s, out_t = self.raw_scores(e_s, e_t, idx)
        n = self.memory_s.shape[0]
        self.z.copy_(torch.stack([out_s.mean() * n, out_t.mean() * n]))

    def forward(self, e_s: Tensor, e_t: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        out_s, out_t = self.raw_scores(e_s, e_t, idx)
        return out_s / self.z[0], out_t / self.z[1]

    @torch.no_grad()
    def update(self, e_s: Tensor, e_t: Tensor, index: Tensor) -> None:
        for memory, e in ((self.memory_s, e_s), (self.memory_t, e_t)):
            row = memory[index] * self.momentum + e.detach() * (1 - self.momentum)
            memory.index_copy_(0, index, F.normalize(row, dim=1))


def contrast_per_sample(scores: Tensor, num_train: int, eps: float = 1e-7) -> Tensor:
    """NCE loss per anchor, ``[B]``: ``−log(P_pos / (P_pos + K·P_n)) − Σ_k log(K·P_n / (P_k + K·P_n))`` with
    ``P_n = 1/N``; column 0 of ``scores`` is the positive. The batch mean is mdistiller's ``ContrastLoss``."""
    k = scores.shape[1] - 1
    noise = k / num_train
    log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_d1 + log_d0.sum(1))


@LOSSES.register("crd")
class CRD(DistillLoss):
    """``L_CRD = (1/B) Σ_i Σ_m w_{i,m} (ℓ^{S→T}_{i,m} + ℓ^{T→S}_{i,m})`` with the NCE loss of
    :func:`contrast_per_sample` in both directions: student embedding against the teacher memory and teacher embedding
    against the student memory. Embeddings ``e = normalize(W · flatten(f))`` (``feat_dim`` wide) of the embedding taps.
    The positive is the sample's own row (``batch.index``); the ``nce_k`` negatives are drawn uniformly from the
    ``num_train`` rows, with replacement. One embedding pair and memory per teacher.

    Source: Tian et al. 2020; mdistiller ``CRD.py`` (feat_dim 128, τ 0.07, momentum 0.5, K 16384; run with weight
    0.8). ``nce_k`` defaults to 4096 here (our choice: memory and time on small data sets); set 16384 for the paper.
    Term: ``crd``.
    """

    def __init__(
        self,
        *,
        feat_dim: int = 128,
        nce_k: int = 4096,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        **context: Any,
    ):
        super().__init__(**context)
        if self.num_train < 2:
            raise ValueError(f"CRD needs the training-set size (self.num_train) for its memory bank; got {self.num_train}.")
        if feat_dim < 1 or nce_k < 1:
            raise ValueError(f"feat_dim and nce_k must be >= 1; got feat_dim={feat_dim}, nce_k={nce_k}.")
        if nce_t <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"nce_t must be > 0 and momentum in [0, 1); got nce_t={nce_t}, momentum={momentum}.")
        self.feat_dim = int(feat_dim)
        self.nce_k = int(nce_k)
        self.nce_t = float(nce_t)
        self.momentum = float(momentum)
        self.embed_s = nn.ModuleList()
        self.embed_t = nn.ModuleList()
        self.memories = nn.ModuleList()

    def student_tap_names(self) -> set[str]:
        return {self.student_taps.embedding_tap}

    def teacher_tap_names(self) -> list[set[str]]:
        return [{t.embedding_tap} for t in self.teacher_taps]

    def embeddings(self, batch: DistillBatch, m: int) -> tuple[Tensor, Tensor]:
        f_s = embedding(student_feature(batch, self.student_taps.embedding_tap))
        f_t = embedding(teacher_feature(batch, m, self.teacher_taps[m].embedding_tap))
        return F.normalize(self.embed_s[m](f_s), dim=1), F.normalize(self.embed_t[m](f_t), dim=1)

    def sample_indices(self, index: Tensor) -> Tensor:
        """``[B, K + 1]`` memory rows: the sample's own row, then ``K`` uniform draws."""
        if index.min() < 0 or index.max() >= self.num_train:
            raise ValueError(
                f"CRD needs batch.index in [0, num_train={self.num_train}); got values in "
                f"[{int(index.min())}, {int(index.max())}]. The data loader must yield each sample's position in the "
                f"training split."
            )
        idx = torch.randint(0, self.num_train, (len(index), self.nce_k + 1), device=index.device)
        idx[:, 0] = index
        return idx

    def setup(self, batch: DistillBatch) -> None:
        f_s = embedding(student_feature(batch, self.student_taps.embedding_tap))
        device = f_s.device
        out = (1, self.feat_dim)
        self.embed_s = nn.ModuleList(linear_adapter(f_s.shape, out) for _ in range(self.num_teachers)).to(device)
        self.embed_t = nn.ModuleList(
            linear_adapter(embedding(teacher_feature(batch, m, t.embedding_tap)).shape, out)
            for m, t in enumerate(self.teacher_taps)
        ).to(device)
        self.memories = nn.ModuleList(
            ContrastMemory(self.feat_dim, self.num_train, self.nce_t, self.momentum) for _ in range(self.num_teachers)
        ).to(device)
        idx = self.sample_indices(batch.index.to(device))
        with torch.no_grad():
            for m, memory in enumerate(self.memories):
                memory.estimate_z(*self.embeddings(batch, m), idx)

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        index = batch.index.to(batch.student_logits.device)
        idx = self.sample_indices(index)
        per_teacher = []
        for m, memory in enumerate(self.memories):
            e_s, e_t = self.embeddings(batch, m)
            out_s, out_t = memory(e_s, e_t, idx)
            per_teacher.append(contrast_per_sample(out_s, self.num_train) + contrast_per_sample(out_t, self.num_train))
            memory.update(e_s, e_t, index)
        return {"crd": combine_teachers(torch.stack(per_teacher, dim=1), batch.teacher_weights)}
