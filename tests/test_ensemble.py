"""Multi-teacher aggregators (hpmkd.ensemble): weights checked against NumPy, detachment, the attention network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpmkd.ensemble import AGGREGATORS, AggregateOut
from hpmkd.registry import ConfigError

CONTEXT = dict(num_teachers=3, num_classes=3, input_shape=(4,))

# Three teachers, two samples, three classes. Labels: sample 0 -> class 0, sample 1 -> class 2.
LOGITS = np.array(
    [
        [[4.0, 0.0, 0.0], [0.0, 0.0, 3.0]],  # teacher 0: confident and right on both samples
        [[1.0, 0.5, 0.0], [0.5, 0.0, 0.2]],  # teacher 1: unsure, right on sample 0, wrong on sample 1
        [[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]],  # teacher 2: confident but wrong on sample 0, right (unsure) on 1
    ]
)
LABELS = np.array([0, 2])


def build(name: str, **options):
    context = dict(CONTEXT)
    if "num_teachers" in options:
        context["num_teachers"] = options.pop("num_teachers")
    return AGGREGATORS.build(name, options, **context)


def run(aggregator, logits=LOGITS, labels=LABELS, temperature=4.0, x=None) -> AggregateOut:
    z = torch.tensor(logits, dtype=torch.float32)
    b = z.shape[1]
    x = torch.zeros(b, *aggregator.input_shape) if x is None else x
    return aggregator(z, torch.tensor(labels), x, torch.zeros(b, z.shape[2]), torch.tensor(temperature))


def np_softmax(a: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_entropy_weights_match_numpy_and_favour_the_confident_teacher():
    out = run(build("entropy"))
    q = np_softmax(LOGITS, axis=-1)
    h = -(q * np.log2(q)).sum(-1)  # [M, B], bits as MT-BKD
    raw = 1 - h / h.sum(0)
    expected = (raw / raw.sum(0)).T  # [B, M]
    np.testing.assert_allclose(out.weights.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(out.weights.sum(1).numpy(), 1.0, rtol=1e-6)
    assert build("entropy").mix == "loss" and out.terms == {} and out.confidence is None
    # sample 0: teachers 0 and 2 are both confident, teacher 1 (most uncertain) gets the smallest weight
    assert out.weights[0, 1] < out.weights[0, 0] and out.weights[0, 1] < out.weights[0, 2]
    # sample 1: teacher 0 (3 vs 0 vs 0) is the most confident
    assert int(out.weights[1].argmax()) == 0


def test_entropy_weights_are_uniform_when_every_teacher_is_one_hot():
    logits = np.array([[[80.0, 0.0, 0.0]], [[0.0, 80.0, 0.0]], [[0.0, 0.0, 80.0]]])
    out = run(build("entropy"), logits=logits, labels=np.array([0]))
    np.testing.assert_allclose(out.weights.numpy(), np.full((1, 3), 1 / 3), rtol=1e-6)


def test_confidence_weights_match_camkd_and_favour_the_teacher_closer_to_the_label():
    out = run(build("confidence"))
    log_q = np.log(np_softmax(LOGITS, axis=-1))
    ce = -log_q[:, np.arange(2), LABELS]  # [M, B]
    expected = ((1 - np_softmax(ce, axis=0)) / (3 - 1)).T
    np.testing.assert_allclose(out.weights.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(out.weights.sum(1).numpy(), 1.0, rtol=1e-6)
    # sample 0: teacher 2 is as confident as teacher 0 but wrong; CA-MKD ranks it last (unlike entropy weights)
    assert out.weights[0, 0] > out.weights[0, 1] > out.weights[0, 2]
    assert int(out.weights[1].argmax()) == 0
    assert build("confidence").mix == "loss"


def test_variance_weights_favour_the_teacher_nearest_the_consensus():
    # teachers 0 and 1 agree, teacher 2 disagrees; tau = 1 makes the differences large
    logits = np.array([[[3.0, 0.0, 0.0]], [[2.5, 0.5, 0.0]], [[0.0, 0.0, 3.0]]])
    out = run(build("variance", kappa=0.1, nu=0.5, tau=1.0), logits=logits, labels=np.array([0]))
    q = np_softmax(logits, axis=-1)
    u = ((q - q.mean(0)) ** 2).sum(-1)  # [M, B]
    np.testing.assert_allclose(out.weights.numpy(), np_softmax(-u / 0.1, axis=0).T, rtol=1e-5)
    np.testing.assert_allclose(out.confidence.numpy(), np.exp(-u.mean(0) / 0.5), rtol=1e-5)
    assert int(out.weights[0].argmax()) in (0, 1) and out.weights[0, 2] < 0.05
    assert build("variance").mix == "probs"


def test_variance_uses_the_step_temperature_by_default():
    q = np_softmax(LOGITS / 2.0, axis=-1)
    u = ((q - q.mean(0)) ** 2).sum(-1)
    out = run(build("variance"), temperature=2.0)
    np.testing.assert_allclose(out.weights.numpy(), np_softmax(-u / 0.1, axis=0).T, rtol=1e-5)
    # full agreement: confidence 1
    same = np.repeat(LOGITS[:1], 3, axis=0)
    np.testing.assert_allclose(run(build("variance"), logits=same).confidence.numpy(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name, mix", [("mean_logits", "logits"), ("mean_probs", "probs"), ("mean_loss", "loss")])
def test_uniform_aggregators(name, mix):
    aggregator = build(name)
    out = run(aggregator)
    assert aggregator.mix == mix
    np.testing.assert_allclose(out.weights.numpy(), np.full((2, 3), 1 / 3), rtol=1e-6)
    assert out.terms == {}


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_single_teacher_weights_are_ones(name):
    out = run(build(name, num_teachers=1), logits=LOGITS[:1])
    assert out.weights.shape == (2, 1)
    np.testing.assert_array_equal(out.weights.detach().numpy(), np.ones((2, 1)))
    assert out.terms == {}


@pytest.mark.parametrize("name", ["entropy", "confidence", "variance"])
def test_heuristic_weights_are_detached(name):
    z = torch.tensor(LOGITS, dtype=torch.float32, requires_grad=True)
    temperature = torch.tensor(4.0, requires_grad=True)
    out = build(name)(z, torch.tensor(LABELS), torch.zeros(2, 4), torch.zeros(2, 3), temperature)
    assert not out.weights.requires_grad and out.weights.grad_fn is None
    assert list(build(name).parameters()) == []


def test_attention_terms_match_their_equations_and_gradients_reach_the_network():
    torch.manual_seed(0)
    aggregator = build("attention", beta=0.5, label_weight=2.0, hidden=8, dropout=0.0)
    aggregator.train()
    x = torch.randn(2, 4)
    out = run(aggregator, x=x)
    a = out.weights.detach().numpy()
    np.testing.assert_allclose(a.sum(1), 1.0, rtol=1e-6)
    entropy = -(a * np.log(a)).sum(1)
    np.testing.assert_allclose(out.terms["attn_entropy"].item(), 0.5 * -entropy.mean(), rtol=1e-5)
    mixed = np.einsum("bm,mbc->bc", a, LOGITS)
    ce = -np.log(np_softmax(mixed, axis=-1))[np.arange(2), LABELS].mean()
    np.testing.assert_allclose(out.terms["attn_label"].item(), 2.0 * ce, rtol=1e-5)
    assert not out.weights.requires_grad  # the KD methods see detached weights by default
    sum(out.terms.values()).backward()
    assert aggregator.embeddings.grad is not None and aggregator.embeddings.grad.abs().sum() > 0
    assert all(p.grad is not None for p in aggregator.parameters())
    pure = run(build("attention", label_weight=0.0, beta=0.0, learn_from_kd=True), x=x)
    assert pure.terms == {}
    assert pure.weights.requires_grad  # the paper's form: the KD loss trains the weights
    with pytest.raises(ConfigError, match="nothing trains the weights"):
        build("attention", label_weight=0.0, beta=0.0)


def test_attention_pools_image_inputs():
    aggregator = AGGREGATORS.build("attention", {"pool_size": 2}, num_teachers=2, num_classes=3, input_shape=(3, 8, 8))
    out = run(aggregator, logits=LOGITS[:2], x=torch.randn(2, 3, 8, 8))
    assert out.weights.shape == (2, 2)
    with pytest.raises(ValueError, match="input"):
        run(aggregator, logits=LOGITS[:2], x=torch.randn(2, 3, 16, 16))


def kd_logit_mix(student_logits, teacher_logits, weights, T):
    """Hinton's ``T² · KL(σ(Σ_m w_m z_m / T) || σ(z_S / T))`` for the ``logits`` mix, batch mean."""
    target = F.log_softmax(torch.einsum("bm,mbc->bc", weights, teacher_logits) / T, dim=-1)
    log_q = F.log_softmax(student_logits / T, dim=-1)
    return T**2 * (target.exp() * (target - log_q)).sum(-1).mean()


def test_attention_learns_to_ignore_a_noise_teacher():
    """Teacher 0 is right with margin 4, teacher 1 gives random logits; trained jointly with a linear student."""
    torch.manual_seed(0)
    n, d, c = 2048, 10, 4
    x = torch.randn(n, d)
    y = (x @ torch.randn(d, c)).argmax(1)
    good = 4.0 * F.one_hot(y, c).float()
    noise = 3.0 * torch.randn(n, c)
    teachers = torch.stack([good, noise])  # [M, N, C]
    student = torch.nn.Linear(d, c)
    aggregator = AGGREGATORS.build("attention", {}, num_teachers=2, num_classes=c, input_shape=(d,))
    optimizer = torch.optim.Adam([*student.parameters(), *aggregator.parameters()], lr=3e-3)
    temperature = torch.tensor(4.0)
    for _ in range(300):
        idx = torch.randint(0, n, (64,))
        logits = student(x[idx])
        out = aggregator(teachers[:, idx], y[idx], x[idx], logits, temperature)
        loss = F.cross_entropy(logits, y[idx]) + kd_logit_mix(logits, teachers[:, idx], out.weights, temperature)
        loss = loss + sum(out.terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    aggregator.eval()
    with torch.no_grad():
        weights = aggregator(teachers[:, :512], y[:512], x[:512], student(x[:512]), temperature).weights
    assert weights[:, 1].mean() < 0.3


def test_bad_input_gets_clear_errors():
    with pytest.raises(ConfigError, match="kappa"):
        build("variance", kappa=0.0)
    with pytest.raises(ConfigError, match="temprature"):
        build("variance", temprature=1.0)
    with pytest.raises(ConfigError, match="entropy"):
        AGGREGATORS.get("entropi")
    with pytest.raises(ConfigError, match="dropout"):
        build("attention", dropout=1.5)
    with pytest.raises(ValueError, match="built for 3 teachers"):
        run(build("entropy"), logits=LOGITS[:2])
    with pytest.raises(ValueError, match=r"\[M, B, C\]"):
        build("entropy")(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4), torch.zeros(2, 3),
                         torch.tensor(1.0))
