"""Temperature schedules (hpmkd.temperature): range, endpoints by hand, checkpoints, the meta hypergradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from hpmkd.registry import ConfigError
from hpmkd.temperature import SCHEDULES, MetaTemperature, ScheduleState

TOTAL_STEPS, TOTAL_EPOCHS = 400, 8


def state(step: int, loss: float, total_steps: int = TOTAL_STEPS, total_epochs: int = TOTAL_EPOCHS) -> ScheduleState:
    return ScheduleState(step=step, total_steps=total_steps, epoch=step * total_epochs // total_steps,
                         total_epochs=total_epochs, train_loss=loss)


def wild_losses(n: int) -> list[float]:
    """Spikes, zeros, negatives, plateaus, tiny values and a steady decline, interleaved."""
    rng = np.random.default_rng(0)
    base = list(np.exp(rng.normal(0.0, 2.0, n // 2)))
    base[::7] = [1e6] * len(base[::7])
    base[3::11] = [-50.0] * len(base[3::11])
    base[5::13] = [0.0] * len(base[5::13])
    decline = list(np.linspace(5.0, 1e-9, n - len(base)))
    return [float(v) for pair in zip(base, decline) for v in pair] + [float(v) for v in base[len(decline):]]


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_stays_in_range_over_a_wild_run(name):
    schedule = SCHEDULES.build(name, {})
    t_min, t_max = (4.0, 4.0) if name == "fixed" else (2.0, 6.0)
    seen = [schedule.value()]
    for step, loss in enumerate(wild_losses(TOTAL_STEPS), start=1):
        schedule.observe(state(step, loss))
        seen.append(schedule.value())
        assert t_min - 1e-6 <= seen[-1] <= t_max + 1e-6, (step, seen[-1])
    if name in ("linear", "cosine"):
        assert max(seen) == pytest.approx(6.0) and min(seen) == pytest.approx(2.0)
    assert isinstance(schedule.current(), torch.Tensor) and schedule.current().dim() == 0


@pytest.mark.parametrize(
    "name, fraction",
    [("linear", lambda p: 1 - p), ("cosine", lambda p: (1 + math.cos(math.pi * p)) / 2)],
)
def test_linear_and_cosine_values_by_hand(name, fraction):
    schedule = SCHEDULES.build(name, {"T_min": 1.0, "T_max": 5.0})
    assert schedule.value() == pytest.approx(5.0)  # before the first step: T_max
    for step, expected in [(0, 5.0), (100, 1 + 4 * fraction(0.25)), (200, 3.0), (400, 1.0), (500, 1.0)]:
        schedule.observe(state(step, 1.0))
        assert schedule.value() == pytest.approx(expected, abs=1e-6), step
    schedule.observe(state(100, 1.0))
    assert schedule.value() == pytest.approx({"linear": 4.0, "cosine": 3 + 2 * math.cos(math.pi / 4)}[name], abs=1e-6)


def test_loss_based_by_hand():
    schedule = SCHEDULES.build("loss_based", {"momentum": 0.5})
    losses = [3.0, 1.0, 2.0, 5.0]
    ema, low, high, expected = None, math.inf, -math.inf, []
    for loss in losses:
        ema = loss if ema is None else 0.5 * ema + 0.5 * loss
        low, high = min(low, ema), max(high, ema)
        expected.append(4.0 if high == low else 2.0 + 4.0 * (ema - low) / (high - low))
    got = []
    for step, loss in enumerate(losses, start=1):
        schedule.observe(state(step, loss))
        got.append(schedule.value())
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert expected[1] == pytest.approx(2.0)  # the EMA at its running minimum: T_min


def test_convergence_by_hand():
    schedule = SCHEDULES.build("convergence", {"momentum": 0.5, "lam": 1.0})
    losses = [2.0, 1.0, 1.0, 3.0]
    steps_per_epoch = 10 / 2
    ema, slope, expected = None, None, []
    for loss in losses:
        if ema is None:
            ema = loss
            expected.append(4.0)
            continue
        new = 0.5 * ema + 0.5 * loss
        rate = (new - ema) * steps_per_epoch
        slope = rate if slope is None else 0.5 * slope + 0.5 * rate
        ema = new
        expected.append(2.0 + 4.0 * math.exp(-abs(slope)))
    got = []
    for step, loss in enumerate(losses, start=1):
        schedule.observe(state(step, loss, total_steps=10, total_epochs=2))
        got.append(schedule.value())
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_convergence_is_low_while_the_loss_falls_and_rises_once_it_flattens():
    schedule = SCHEDULES.build("convergence", {"momentum": 0.9, "lam": 5.0})
    values = []
    for step in range(1, TOTAL_STEPS + 1):  # 50 steps per epoch: falls by ~1 per epoch, then flat
        schedule.observe(state(step, max(5.0 - step / 50, 1.0)))
        values.append(schedule.value())
    assert values[150] < 2.1  # |dL/dt| ≈ 1 per epoch: s = exp(-5) ≈ 0.007
    assert values[-1] > 5.9  # flat for 200 steps: s → 1


@pytest.mark.parametrize("name", ["linear", "cosine", "loss_based", "convergence"])
def test_state_dict_round_trip(name):
    losses = wild_losses(60)
    schedule = SCHEDULES.build(name, {})
    for step, loss in enumerate(losses[:30], start=1):
        schedule.observe(state(step, loss, total_steps=60, total_epochs=3))
    restored = SCHEDULES.build(name, {})
    restored.load_state_dict(schedule.state_dict())
    assert restored.value() == schedule.value()
    for step, loss in enumerate(losses[30:], start=31):
        schedule.observe(state(step, loss, total_steps=60, total_epochs=3))
        restored.observe(state(step, loss, total_steps=60, total_epochs=3))
        assert restored.value() == schedule.value()


def test_non_finite_loss_is_rejected():
    schedule = SCHEDULES.build("loss_based", {})
    with pytest.raises(ValueError, match="non-finite"):
        schedule.observe(state(1, float("nan")))


def test_bad_options_get_clear_errors():
    with pytest.raises(ConfigError, match="T_min <= T_max"):
        SCHEDULES.build("cosine", {"T_min": 6, "T_max": 2}, "distill.temperature")
    with pytest.raises(ConfigError, match="outside"):
        SCHEDULES.build("loss_based", {"T": 9}, "distill.temperature")
    with pytest.raises(ConfigError, match="T_min < T < T_max"):
        SCHEDULES.build("meta", {"T": 2.0})
    with pytest.raises(ConfigError, match="adam"):
        SCHEDULES.build("meta", {"meta_optimizer": "adm"})
    with pytest.raises(ConfigError, match="distill.temperature.Tmax"):
        SCHEDULES.build("linear", {"Tmax": 6}, "distill.temperature")
    with pytest.raises(ConfigError, match="momentum"):
        SCHEDULES.build("convergence", {"momentum": 1.0})


# --- meta: a tiny linear student distilled from a linear teacher ------------------------------------------------

CLASSES, DIM = 3, 3


def meta_problem(teacher_right: bool, seed: int = 0):
    """Class-clustered inputs; the teacher's logits put margin 10 on the true class (``teacher_right``) or on the
    next class (a confidently wrong teacher). The student starts at zero. One SGD step on the KD loss pushes the
    student's logits toward the teacher by ``T·(σ(z_T/T) − 1/C)`` (the gradient of ``T²·KL`` at zero), which grows
    with T over [2, 6] for margin 10, so a larger T lowers the validation CE for the right teacher and raises it for
    the wrong one (the test checks this directly before relying on it)."""
    g = torch.Generator().manual_seed(seed)

    def sample(n):
        y = torch.randint(0, CLASSES, (n,), generator=g)
        x = 2.0 * F.one_hot(y, CLASSES).double() + 0.3 * torch.randn(n, DIM, generator=g, dtype=torch.float64)
        return x, y

    x, y = sample(64)
    x_val, y_val = sample(64)
    target = y if teacher_right else (y + 1) % CLASSES
    teacher_logits = 10.0 * F.one_hot(target, CLASSES).double()
    student = torch.nn.Linear(DIM, CLASSES, dtype=torch.float64)
    torch.nn.init.zeros_(student.weight)
    torch.nn.init.zeros_(student.bias)

    def train_loss(params, T):
        log_q = F.log_softmax(functional_call(student, params, (x,)) / T, dim=-1)
        log_p = F.log_softmax(teacher_logits / T, dim=-1)
        return T**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    def val_loss(params):
        return F.cross_entropy(functional_call(student, params, (x_val,)), y_val)

    return student, train_loss, val_loss


def look_ahead_val_loss(student, train_loss, val_loss, T: float, lr: float) -> float:
    """``L_val(θ − lr·∇θ L_train(θ, T))`` computed directly (no hypergradient), for finite differences."""
    params = dict(student.named_parameters())
    grads = torch.autograd.grad(train_loss(params, torch.tensor(T, dtype=torch.float64)), list(params.values()))
    stepped = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
    return float(val_loss(stepped).detach())


@pytest.mark.parametrize("teacher_right, direction", [(True, +1), (False, -1)])
def test_meta_moves_T_the_way_that_lowers_the_validation_loss(teacher_right, direction):
    student, train_loss, val_loss = meta_problem(teacher_right)
    lr = 0.5
    # the case really needs it: the look-ahead validation loss at T_max vs T_min
    better_high = look_ahead_val_loss(student, train_loss, val_loss, 5.9, lr) < look_ahead_val_loss(
        student, train_loss, val_loss, 2.1, lr)
    assert better_high == (direction > 0)

    schedule = SCHEDULES.build("meta", {"meta_lr": 0.2})
    assert schedule.learns_from_held_out and schedule.value() == pytest.approx(4.0, abs=1e-6)
    before = {k: p.detach().clone() for k, p in student.named_parameters()}
    values = [schedule.value()]
    for _ in range(5):
        T = schedule.value()
        g_t = schedule.hyper_step(train_loss, val_loss, dict(student.named_parameters()), lr)
        h = 1e-3
        finite_diff = (look_ahead_val_loss(student, train_loss, val_loss, T + h, lr)
                       - look_ahead_val_loss(student, train_loss, val_loss, T - h, lr)) / (2 * h)
        assert np.sign(g_t) == np.sign(finite_diff) == -direction
        assert g_t == pytest.approx(finite_diff, rel=1e-3)
        values.append(schedule.value())
    assert all(direction * (b - a) > 0 for a, b in zip(values, values[1:])), values
    assert 2.0 < values[-1] < 6.0
    # the look-ahead neither changed the student nor left gradients on it
    for k, p in student.named_parameters():
        assert torch.equal(p.detach(), before[k]) and p.grad is None


def test_meta_current_is_differentiable_and_plain_sgd_follows_the_hypergradient():
    schedule = SCHEDULES.build("meta", {"T": 3.0, "T_min": 1.0, "T_max": 5.0, "meta_lr": 0.1, "meta_optimizer": "sgd"})
    assert schedule.current().requires_grad
    student, train_loss, val_loss = meta_problem(teacher_right=True)
    rho = float(schedule.rho.detach())
    g_t = schedule.hyper_step(train_loss, val_loss, dict(student.named_parameters()), 0.5)
    s = 1 / (1 + math.exp(-rho))
    assert float(schedule.rho.detach()) == pytest.approx(rho - 0.1 * g_t * 4.0 * s * (1 - s), rel=1e-5)
    schedule.observe(state(1, 123.0))  # observe does not move a meta temperature
    assert float(schedule.rho.detach()) == pytest.approx(rho - 0.1 * g_t * 4.0 * s * (1 - s), rel=1e-5)


def test_meta_state_dict_restores_T_and_the_adam_state():
    student, train_loss, val_loss = meta_problem(teacher_right=True)
    params = dict(student.named_parameters())
    schedule = SCHEDULES.build("meta", {"meta_lr": 0.2})
    for _ in range(3):
        schedule.hyper_step(train_loss, val_loss, params, 0.5)
    restored = SCHEDULES.build("meta", {"meta_lr": 0.2})
    restored.load_state_dict(schedule.state_dict())
    fresh = SCHEDULES.build("meta", {"meta_lr": 0.2})  # same T, but an Adam without moments
    with torch.no_grad():
        fresh.rho.copy_(schedule.rho)
    assert restored.value() == schedule.value() == fresh.value()
    for s in (schedule, restored, fresh):
        s.hyper_step(train_loss, val_loss, params, 0.5)
    assert restored.value() == pytest.approx(schedule.value(), abs=1e-7)
    assert abs(fresh.value() - schedule.value()) > 1e-4


def test_meta_refuses_a_loss_without_temperature():
    student, _, val_loss = meta_problem(teacher_right=True)
    schedule = MetaTemperature()

    def no_temperature(params, T):
        return val_loss(params)

    with pytest.raises(ValueError, match="does not depend on T"):
        schedule.hyper_step(no_temperature, val_loss, dict(student.named_parameters()), 0.5)
