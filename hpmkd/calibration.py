"""Temperature scaling (Guo, Pleiss, Sun, Weinberger 2017, "On Calibration of Modern Neural Networks", ICML): one
temperature ``T`` fitted on the validation split's NLL, the predictor's scores divided by it. The cheap post-hoc
calibration Bayesian methods are compared with (MT-BKD's benchmark, ``benchmarks/mtbkd.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the search interval of ``log T``
LOG_T_RANGE = (-3.0, 3.0)


def fit_temperature(log_probs: Tensor, y: Tensor, steps: int = 100) -> float:
    """``argmin_T −(1/N) Σ_i log softmax(s_i / T)_{y_i}`` over the scores ``log_probs`` ``[N, C]`` (a predictor's log
    predictive distribution: the softmax is shift-invariant, so logits give the same ``T``), by L-BFGS on ``log T``
    from ``T = 1``, clamped to ``exp(±3)``."""
    scores = log_probs.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(scores / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().clamp(*LOG_T_RANGE).exp())


class TemperatureScaled(nn.Module):
    """``predictor`` with its log predictive distribution divided by ``temperature``: scores ``log_softmax(s) / T``
    (for one network, the same distribution as ``logits / T``)."""

    def __init__(self, predictor: nn.Module, temperature: float):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.predictor, self.temperature = predictor, float(temperature)

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.predictor(x), -1) / self.temperature
