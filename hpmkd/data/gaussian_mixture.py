"""``gaussian_mixture``: a synthetic classification task whose class probabilities are known for every input, so a
predictor's probabilities (and a posterior's credible intervals of them) can be checked against the truth.

Each of ``classes`` classes is a mixture of ``components`` Gaussians in ``dim`` dimensions with covariance
``scale² I``, the component means drawn once from ``N(0, separation² I)`` by the generating ``seed``; classes are
equally likely. Inputs and labels are drawn from the joint distribution (``samples`` rows for training and
validation, ``test_samples`` for the test split, from separate streams of the same seed), and the true class
probabilities of an input are, by Bayes' rule and in log space,

    p(c | x) = Σ_k N(x; μ_ck, scale² I) / Σ_c' Σ_k N(x; μ_c'k, scale² I).

The task is fixed by its options (not by the experiment seed, which only splits the training rows into train and
validation). Inputs are ``[N, dim]`` float32 vectors, standardised with the training split's statistics. Our
design, in the spirit of the synthetic studies of BKD (Fang et al., ICML 2024) and MT-BKD (arXiv 2605.27967).
"""

from __future__ import annotations

import numpy as np

from hpmkd.data.base import DATASETS, RawData


def mixture_means(classes: int, components: int, dim: int, separation: float, seed: int) -> np.ndarray:
    """The component means ``[classes, components, dim]``."""
    return np.random.default_rng([seed, 0]).normal(0.0, separation, size=(classes, components, dim))


def class_log_probs(x: np.ndarray, means: np.ndarray, scale: float) -> np.ndarray:
    """``log p(c | x)`` ``[N, classes]`` for inputs ``[N, dim]`` (equal class and component weights)."""
    from scipy.special import logsumexp  # on use: every process that imports the data sets would pay 0.2 s for it

    sq = ((x[:, None, None, :] - means[None]) ** 2).sum(-1)  # [N, classes, components]
    joint = logsumexp(-0.5 * sq / scale**2, axis=2)  # the shared normalising constants cancel
    return joint - logsumexp(joint, axis=1, keepdims=True)


def draw(count: int, means: np.ndarray, scale: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` labelled inputs from the mixture."""
    classes, components, dim = means.shape
    y = rng.integers(0, classes, count)
    k = rng.integers(0, components, count)
    return means[y, k] + scale * rng.normal(size=(count, dim)), y


@DATASETS.register("gaussian_mixture")
def gaussian_mixture(classes: int = 3, components: int = 2, dim: int = 2, separation: float = 2.0,
                     scale: float = 1.0, samples: int = 4000, test_samples: int = 2000, seed: int = 0) -> RawData:
    if min(classes, components, dim, samples, test_samples) < 1 or classes < 2:
        raise ValueError("classes (>= 2), components, dim, samples and test_samples must be positive integers.")
    if not separation > 0 or not scale > 0:
        raise ValueError(f"separation and scale must be > 0, got {separation} and {scale}.")
    means = mixture_means(classes, components, dim, separation, seed)
    train_x, train_y = draw(samples, means, scale, np.random.default_rng([seed, 1]))
    test_x, test_y = draw(test_samples, means, scale, np.random.default_rng([seed, 2]))
    return RawData(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        class_names=[f"class_{c}" for c in range(classes)],
        source=f"synthetic Gaussian mixture (seed {seed})",
        to_model=lambda x: x.astype(np.float32),
        preprocessing="float [N,D]",
        class_probs=lambda x: np.exp(class_log_probs(x, means, scale)),
    )
