"""Efficiency test metrics, as HumP-KD reports its student and teachers (Mainuddin et al., arXiv 2606.14684:
"4.94 M parameters, 19.01 MB, 37.72 CPU FPS"): the predictor's size and its CPU throughput at batch 1.

* ``size_mb``: the bytes of its state dict (parameters and buffers, as stored) in MiB (2^20 bytes);
* ``cpu_fps``: frames per second of one-image forward passes on the CPU with :data:`FPS_THREADS` torch thread(s),
  on the first test image, after :data:`WARMUP` passes, timed over at least :data:`MIN_PASSES` passes and until
  :data:`BUDGET_S` seconds have gone by (at most :data:`MAX_PASSES`). A copy of the predictor is timed; its device
  is left alone.

Recorded per final stage when ``evaluation.efficiency`` is on (``test_size_mb``, ``test_cpu_fps``); a throughput measured while other work shares the machine
is noisy, so comparisons between models are made side by side in one process (``benchmarks/humpkd.py``).
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from hpmkd.data.source import BatchSource

FPS_THREADS = 1
WARMUP = 3
MIN_PASSES = 5
MAX_PASSES = 200
BUDGET_S = 0.25


def size_mb(model: nn.Module) -> float:
    """MiB of ``model``'s state dict tensors."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


@torch.no_grad()
def cpu_fps(model: nn.Module, x: torch.Tensor, threads: int = FPS_THREADS, budget_s: float = BUDGET_S) -> float:
    """One-image forward passes per second of a CPU copy of ``model`` on ``x`` (``[1, ...]``), ``threads`` threads."""
    model = copy.deepcopy(model).cpu().eval()
    x = x.cpu()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(WARMUP):
            model(x)
        passes, began = 0, time.perf_counter()
        while passes < MIN_PASSES or (passes < MAX_PASSES and time.perf_counter() - began < budget_s):
            model(x)
            passes += 1
        return passes / (time.perf_counter() - began)
    finally:
        torch.set_num_threads(before)


def efficiency(predictor: nn.Module, split: BatchSource) -> dict[str, float]:
    """``size_mb`` and ``cpu_fps`` of the predictor on the first row of ``split`` (module docstring)."""
    if len(split) == 0:
        return {}
    return {"size_mb": size_mb(predictor), "cpu_fps": cpu_fps(predictor, split.rows(torch.arange(1))[0])}
