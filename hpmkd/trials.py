"""N independent trials of two methods compared as HumP-KD reports them (Mainuddin et al., arXiv 2606.14684: "F1
0.9876 ± 0.0063 over 10 trials against 0.9537 ± 0.0351 without KD; t-test p = 0.0195; Wilcoxon W = 1, p = 0.0039"):
mean ± sample standard deviation of each, Welch's t-test (independent samples, unequal variances) and the Wilcoxon
signed-rank test on the differences paired by trial (seed), both two-sided, from :mod:`scipy.stats`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class TrialComparison:
    """``method`` against ``baseline`` over the same trials (paired by position)."""

    method_mean: float
    method_std: float
    baseline_mean: float
    baseline_std: float
    welch_t: float
    welch_p: float
    wilcoxon_w: float
    wilcoxon_p: float
    wins: int
    trials: int


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n − 1``; 0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare_trials(method: Sequence[float], baseline: Sequence[float]) -> TrialComparison:
    """Compare two equally long lists of per-trial scores. A test that cannot be computed (fewer than two trials;
    every difference zero for Wilcoxon; no variance for Welch) gives ``nan``."""
    from scipy import stats

    if len(method) != len(baseline) or not method:
        raise ValueError(f"need the same number of trials of each, got {len(method)} and {len(baseline)}.")
    differences = [m - b for m, b in zip(method, baseline)]
    welch_t = welch_p = wilcoxon_w = wilcoxon_p = math.nan
    if len(method) > 1 and (statistics.pvariance(method) > 0 or statistics.pvariance(baseline) > 0):
        result = stats.ttest_ind(method, baseline, equal_var=False)
        welch_t, welch_p = float(result.statistic), float(result.pvalue)
    if any(d != 0 for d in differences):
        result = stats.wilcoxon(method, baseline)
        wilcoxon_w, wilcoxon_p = float(result.statistic), float(result.pvalue)
    return TrialComparison(*mean_std(method), *mean_std(baseline), welch_t, welch_p, wilcoxon_w, wilcoxon_p,
                           sum(d > 0 for d in differences), len(differences))
