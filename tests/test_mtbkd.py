"""MT-BKD's parts on real small data, in this process (no Ray): the Langevin samplers against their formulas and a
posterior known in closed form, the cyclical step size, the two-phase stage (mode, then sampling) and its resume,
the KDE-mode prediction and R-hat, and the ``mtbkd`` pipeline's graph and config checks."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from hpmkd.config import DataConfig, DistillConfig, TrainConfig, config_from_data, load_config
from hpmkd.data import load_dataset
from hpmkd.langevin import PreconditionedSGLD, SGLD
from hpmkd.models.ref import ModelRef
from hpmkd.optim import LR_SCHEDULES, lr_factor, make_optimizer
from hpmkd.pipelines import plan_experiment
from hpmkd.pipelines.mtbkd import PoolPredictors, PosteriorChain
from hpmkd.pipelines.preflight import preflight
from hpmkd.posterior import POSTERIOR, PosteriorSampling
from hpmkd.predictors import KdeModeSamples, load_predictor, save_predictor
from hpmkd.registry import ConfigError
from hpmkd.selection import selected_payload
from hpmkd.teachers import LocalTeachers
from hpmkd.training import StageEnv, StageSpec, train_stage
from hpmkd.uncertainty import kde_modes, split_rhat

ROOT = Path(__file__).resolve().parent.parent
DIGITS = DataConfig(name="digits")
STUDENT = ModelRef("cnn", {"width": 4, "depth": 2, "stages": 2})
TEACHERS = {"wide": ModelRef("mlp", {"hidden": 64, "depth": 1}), "cnn": ModelRef("cnn", {"width": 8, "depth": 2})}


# --- the samplers ----------------------------------------------------------------------------------------------

def test_one_sgld_step_is_the_reference_update():
    """``θ ← θ − ε₁ · N · ∇L + ε₂ · ξ`` with ξ the next standard normal draws, parameter by parameter."""
    a, b = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    ga, gb = torch.tensor([0.3, -0.2, 0.1]), torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    params = [nn.Parameter(a.clone()), nn.Parameter(b.clone())]
    params[0].grad, params[1].grad = ga.clone(), gb.clone()
    optimizer = SGLD(params, lr=8e-8, data_size=18000, noise=4e-4)
    torch.manual_seed(3)
    optimizer.step()
    torch.manual_seed(3)
    xi_a, xi_b = torch.randn(3), torch.randn(2, 2)
    torch.testing.assert_close(params[0].detach(), a - 8e-8 * 18000 * ga + 4e-4 * xi_a, rtol=0, atol=1e-7)
    torch.testing.assert_close(params[1].detach(), b - 8e-8 * 18000 * gb + 4e-4 * xi_b, rtol=0, atol=1e-7)


def test_one_psgld_step_is_the_preconditioned_update():
    a, g = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, -0.02, 0.1])
    p = nn.Parameter(a.clone())
    p.grad = g.clone()
    optimizer = PreconditionedSGLD([p], lr=1e-6, data_size=100, alpha=0.9, eps=1e-5)
    torch.manual_seed(5)
    optimizer.step()
    torch.manual_seed(5)
    v = 0.1 * g * g
    G = 1.0 / (1e-5 + v.sqrt())
    expected = a - 1e-6 * G * 100 * g + math.sqrt(2e-6) * G.sqrt() * torch.randn(3)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(optimizer.state[p]["square_avg"], v)


class Location(nn.Module):
    """The mean θ of a Gaussian with unit variance; the loss is the mean negative log-likelihood ``(y − θ)² / 2``."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(()))

    def forward(self, y):
        return 0.5 * ((y - self.theta) ** 2).mean()


@pytest.mark.parametrize("name, lr", [("sgld", 2.5e-4), ("psgld", 2e-5)])
def test_langevin_samples_match_a_known_gaussian_posterior(name, lr):
    """``y_i ~ N(θ, 1)``, flat prior: the posterior is ``N(ȳ, 1/N)``. The sampler's draws after burn-in match its
    mean and variance (the effective step ε₁·N·G is about 0.05, so the discretisation inflates the variance by
    about 3 %; pSGLD's preconditioner G is about 1/√(1/N) here)."""
    torch.manual_seed(0)
    y = 2.0 + torch.randn(200, dtype=torch.float64)
    model = Location().double()
    cfg = TrainConfig(optimizer=name, lr=lr)
    optimizer = make_optimizer(list(model.parameters()), cfg, data_size=len(y))
    draws = []
    for step in range(15_000):
        optimizer.zero_grad()
        model(y).backward()
        optimizer.step()
        if step >= 1_000:
            draws.append(model.theta.item())
    draws = np.array(draws)
    posterior_sd = 1 / math.sqrt(len(y))
    assert draws.mean() == pytest.approx(y.mean().item(), abs=0.3 * posterior_sd)
    assert draws.var() == pytest.approx(posterior_sd**2, rel=0.2)


def test_the_sampler_gets_the_training_set_size_and_its_options_are_checked():
    optimizer = make_optimizer([nn.Parameter(torch.zeros(2))], TrainConfig(optimizer="sgld", lr=1e-6), data_size=77)
    assert optimizer.param_groups[0]["data_size"] == 77 and optimizer.param_groups[0]["noise"] is None
    given = TrainConfig(optimizer="sgld", lr=1e-6, optimizer_options={"data_size": 5, "noise": 1e-3})
    assert make_optimizer([nn.Parameter(torch.zeros(2))], given, data_size=77).param_groups[0]["data_size"] == 5
    with pytest.raises(ConfigError, match=r"train\.optimizer_options\.nois: unknown option .*Did you mean 'noise'"):
        make_optimizer([nn.Parameter(torch.zeros(2))], TrainConfig(optimizer="sgld", optimizer_options={"nois": 1}))
    with pytest.raises(ConfigError, match="data_size"):
        make_optimizer([nn.Parameter(torch.zeros(2))], TrainConfig(optimizer="psgld"))


def test_the_cyclical_step_size_restarts_each_cycle():
    cfg = TrainConfig(lr_schedule="cyclical", lr_schedule_options={"cycles": 2})
    factor = lr_factor(cfg, total_steps=100, steps_per_epoch=10)
    end_of_cycle = round(0.5 * (math.cos(math.pi * 0.98) + 1), 6)
    assert [round(factor(s), 6) for s in (0, 25, 49, 50, 75)] == [1.0, 0.5, end_of_cycle, 1.0, 0.5]
    with pytest.raises(ConfigError, match=r"train\.lr_schedule_options\.cycle: unknown option .*'cycles'"):
        config_from_data({"experiment": "x", "pipeline": "kd", "teachers": [{"name": "t", "model": "mlp"}],
                          "student": {"model": "mlp"}, "train": {"lr_schedule": "cyclical",
                                                                 "lr_schedule_options": {"cycle": 3}}})
    assert "cyclical" in LR_SCHEDULES


# --- the two-phase stage ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teachers():
    """Two teachers of different families for digits, trained here (a few seconds)."""
    splits = load_dataset("digits", **DIGITS.loader_kwargs(0))
    models = []
    for name, ref in TEACHERS.items():
        states: list[dict[str, Any]] = []
        spec = StageSpec(name, 0, DIGITS, ref, TrainConfig(epochs=4, batch_size=64))
        train_stage(spec, StageEnv(report=lambda metrics, state: states.append(state)))
        model = ref.build(splits.shape)
        model.load_state_dict(states[-1]["best"]["model"])
        models.append(model)
    return models


def chain_spec(params: str = "head", samples: int = 6, thin: int | None = None, predict: str = "bma") -> StageSpec:
    recipe = DistillConfig(ce_weight=1.0, methods={"mtbkd_prior": {"weight": 0.02}}, aggregator={"name": "entropy"},
                           temperature={"schedule": "fixed", "T": 2.0})
    sampler = TrainConfig(epochs=3, batch_size=64, optimizer="sgld", lr=2e-6, lr_schedule="constant")
    sampling = PosteriorSampling(2, sampler, burn_in=5, thin=thin, samples=samples, params=params, predict=predict)
    return StageSpec("chain", 0, DIGITS, STUDENT, TrainConfig(epochs=5, batch_size=64, lr=0.05), distill=recipe,
                     teacher_names=list(TEACHERS), teacher_models=list(TEACHERS.values()),
                     selection="posterior_samples", callback_options={POSTERIOR: sampling})


def saved(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def run_chain(spec: StageSpec, teachers, resume: dict[str, Any] | None = None):
    states: list[dict[str, Any]] = []
    env = StageEnv(teachers=LocalTeachers(list(TEACHERS), teachers), resume_state=resume,
                   report=lambda metrics, state: states.append(saved(state)))
    return train_stage(spec, env), states


def test_the_chain_finds_the_mode_then_keeps_thinned_langevin_samples(teachers):
    result, states = run_chain(chain_spec(), teachers)
    steps_per_epoch = math.ceil(len(load_dataset("digits", **DIGITS.loader_kwargs(0)).train) / 64)
    history = result["history"]
    assert [h["posterior_phase"] for h in history] == [0, 0, 1, 1, 1]
    assert history[1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the mode's cosine schedule ends with the mode epochs
    assert all(h["lr"] == pytest.approx(2e-6) for h in history[2:])  # the sampler's constant step size
    thin = (3 * steps_per_epoch - 5) // 6
    kept = states[-1]["posterior"]
    assert kept["steps"] == [2 * steps_per_epoch + 5 + k * thin for k in range(1, 7)]
    assert states[-1]["optimizer"]["param_groups"][0]["data_size"] == len(load_dataset("digits",
                                                                                       **DIGITS.loader_kwargs(0)).train)
    samples = kept["samples"]
    # head sampling: only the classifier moves, the body (and its BatchNorm statistics) stay at the mode
    assert all(torch.equal(s[k], samples[0][k]) for s in samples for k in s
               if not k.startswith("fc.") and not k.endswith("num_batches_tracked"))
    assert not torch.equal(samples[0]["fc.weight"], samples[-1]["fc.weight"])
    assert result["posterior_samples"] == 6 and math.isfinite(result["val_loglik_rhat"])
    payload = selected_payload(states[-1])
    assert payload["predictor"] == "weight_samples" and len(payload["members"]) == 6
    assert {"test_ece", "test_mutual_information", "test_set_coverage", "test_noise_nll"} <= result.keys()
    assert result["test_mutual_information"] > 0


def test_a_chain_stopped_mid_sampling_resumes_to_the_same_samples(teachers):
    spec = chain_spec()
    whole, states = run_chain(spec, teachers)
    for stop in (0, 2, 3):  # in the mode phase, at the first sampling epoch, in the middle of the sampling
        resumed, later = run_chain(spec, teachers, resume=states[stop])
        assert resumed["resumed_at_epoch"] == stop + 1
        assert later[-1]["posterior"]["steps"] == states[-1]["posterior"]["steps"]
        for mine, theirs in zip(later[-1]["posterior"]["samples"], states[-1]["posterior"]["samples"], strict=True):
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs), stop
        assert resumed["test_nll"] == whole["test_nll"]


def test_sampling_all_parameters_and_the_kde_mode_prediction(teachers, tmp_path):
    result, states = run_chain(chain_spec(params="all", samples=4, thin=10, predict="kde_mode"), teachers)
    samples = states[-1]["posterior"]["samples"]
    assert len(samples) == 4 and not torch.equal(samples[0]["stem.0.weight"], samples[-1]["stem.0.weight"])
    payload = selected_payload(states[-1])
    assert payload["predictor"] == "kde_mode"
    save_predictor(payload, tmp_path / "model.pt")
    splits = load_dataset("digits", **DIGITS.loader_kwargs(0))
    predictor = load_predictor(str(tmp_path / "model.pt"), STUDENT, splits.shape)
    assert isinstance(predictor, KdeModeSamples)
    with torch.no_grad():
        scores, members = predictor.outputs(splits.test.x[:8])
    modes = kde_modes(members)
    torch.testing.assert_close(scores.exp(), modes / modes.sum(-1, keepdim=True))


def test_too_short_a_sampling_phase_is_refused_before_training(teachers):
    spec = chain_spec(samples=500)
    with pytest.raises(ConfigError, match=r"posterior: 3 sampling epochs of \d+ steps give \d+ steps, fewer than "
                                          r"the \d+ that burn_in \(5\)"):
        run_chain(spec, teachers)


# --- KDE mode and R-hat ----------------------------------------------------------------------------------------

def test_kde_modes_match_scipy_gaussian_kde():
    from scipy.stats import gaussian_kde

    torch.manual_seed(0)
    members = torch.log_softmax(torch.randn(24, 3, 4, dtype=torch.float64) * 1.5, -1)
    modes = kde_modes(members)
    grid = np.linspace(0, 1, 600)
    for i in range(3):
        for c in range(4):
            values = members[:, i, c].exp().numpy()
            expected = grid[gaussian_kde(values)(grid).argmax()]
            assert modes[i, c].item() == pytest.approx(expected, abs=1.5 / 599)
    same = torch.log(torch.tensor([[[0.2, 0.8]]], dtype=torch.float64)).expand(5, 1, 2)
    torch.testing.assert_close(kde_modes(same), torch.tensor([[0.2, 0.8]], dtype=torch.float64))


def test_split_rhat_is_the_textbook_formula_and_flags_chains_that_disagree():
    chains = torch.tensor([[1.0, 2.0, 3.0, 4.0, 2.0, 1.0], [2.0, 3.0, 1.0, 2.0, 5.0, 3.0]])
    halves = np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 1.0], [4.0, 2.0, 1.0], [2.0, 5.0, 3.0]])
    n = 3
    w = halves.var(1, ddof=1).mean()
    b = n * halves.mean(1).var(ddof=1)
    assert split_rhat(chains) == pytest.approx(math.sqrt(((n - 1) / n * w + b / n) / w))
    torch.manual_seed(0)
    mixed = torch.randn(4, 2000)
    assert split_rhat(mixed) == pytest.approx(1.0, abs=0.01)
    assert split_rhat(mixed + torch.tensor([[0.0], [0.0], [0.0], [3.0]])) > 1.2
    assert math.isnan(split_rhat(torch.randn(2, 3)))


# --- the pipeline ----------------------------------------------------------------------------------------------

def mtbkd_config(*overrides: str):
    return load_config(ROOT / "conf" / "mtbkd.yaml", list(overrides))


def test_the_mtbkd_graph_runs_chains_side_by_side_and_pools_them():
    cfg = mtbkd_config()
    stages = {s.name: s for s in plan_experiment(cfg).stages}
    assert list(stages) == ["teacher_cnn", "teacher_mlp", "student_alone", "mtbkd_chain_1", "mtbkd_chain_2", "mtbkd"]
    chain = stages["mtbkd_chain_1"].params
    assert isinstance(chain, PosteriorChain) and chain.kind == "posterior_chain"
    assert chain.recipe.train.epochs == 12 + 3 and chain.sampling.mode_epochs == 12
    assert chain.sampling.sampler.optimizer == "sgld" and chain.sampling.sampler.lr == 8e-8
    assert chain.sampling.sampler.optimizer_options == {"noise": 4e-4} and chain.sampling.sampler.epochs == 3
    assert chain.sampling.sampler.lr_schedule == "constant"
    assert (chain.init_seed, stages["mtbkd_chain_2"].params.init_seed) == (None, 1000)
    assert stages["mtbkd_chain_1"].deps == ["teacher_cnn", "teacher_mlp"]
    assert stages["mtbkd"].params == PoolPredictors(cfg.student.ref, ("mtbkd_chain_1", "mtbkd_chain_2"), "bma")
    assert stages["mtbkd"].deps == ["mtbkd_chain_1", "mtbkd_chain_2"]
    assert chain.settings()["sampling"]["samples"] == 16 and "init_seed" not in chain.settings()
    assert stages["mtbkd_chain_2"].params.settings()["init_seed"] == 1000


def test_one_chain_the_mode_only_and_the_deep_ensemble_baseline():
    one = {s.name: s for s in plan_experiment(mtbkd_config("mtbkd.chains=1")).stages}
    assert one["mtbkd"].kind == "posterior_chain" and "mtbkd_chain_1" not in one
    mode = {s.name: s for s in plan_experiment(mtbkd_config("mtbkd.chains=1", "mtbkd.sample_epochs=0")).stages}
    assert mode["mtbkd"].kind == "distill" and mode["mtbkd"].params.recipe.train.epochs == 12
    ensemble = {s.name: s for s in plan_experiment(mtbkd_config("mtbkd.deep_ensemble=4")).stages}
    assert [ensemble[f"ensemble_{k}"].params.init_seed for k in (2, 3, 4)] == [1000, 2000, 3000]
    assert ensemble["deep_ensemble"].params.members == ("student_alone", "ensemble_2", "ensemble_3", "ensemble_4")
    no_baseline = {s.name: s for s in plan_experiment(mtbkd_config("mtbkd.deep_ensemble=2",
                                                                   "distill.baseline=false")).stages}
    assert no_baseline["deep_ensemble"].params.members == ("ensemble_1", "ensemble_2")
    assert no_baseline["ensemble_1"].params.settings() == ensemble["student_alone"].params.settings()


@pytest.mark.parametrize("override, message", [
    ("mtbkd.sampler={optimiser: sgld}", r"mtbkd\.sampler\.optimiser: not a sampling-phase key\. Did you mean"),
    ("mtbkd.sampler={optimizer: sgdl}", r"mtbkd\.sampler\.optimizer: unknown optimizer 'sgdl'"),
    ("mtbkd.sample_epochs=0", r"mtbkd\.chains: 2 chains need sampling"),
    ("mtbkd.deep_ensemble=1", r"mtbkd\.deep_ensemble: 0 \(no deep-ensemble baseline\) or the number of members"),
    ("mtbkd.params=last", r"mtbkd\.params: 'last' is not allowed"),
    ("mtbkd.thin=0", r"mtbkd\.thin: must be >= 1"),
    ("evaluation.shifts={fog: {}}", r"evaluation\.shifts\.fog: unknown test shift 'fog'"),
    ("evaluation.shifts={noise: {sigma: -1}}", r"evaluation\.shifts\.noise: test shift 'noise' rejected"),
    ("evaluation.set_coverage=1.5", r"evaluation\.set_coverage: a probability in \(0, 1\)"),
])
def test_bad_mtbkd_and_evaluation_keys_are_reported_with_their_path(override, message):
    with pytest.raises(ConfigError, match=message):
        mtbkd_config(override)


def test_the_runner_refuses_a_sampling_phase_too_short_before_any_stage():
    cfg = mtbkd_config("data.name=digits", "mtbkd.sample_epochs=1", "mtbkd.samples=64", "mtbkd.burn_in=0")
    with pytest.raises(ConfigError, match=r"mtbkd: 1 sampling epochs of 11 steps give 11 steps, fewer than the 64 "
                                          r"that burn_in \(0\) \+ thin \(1\) x samples \(64\) need\. Raise "
                                          r"mtbkd\.sample_epochs"):
        preflight(plan_experiment(cfg))
    preflight(plan_experiment(dataclasses.replace(cfg, pipeline="kd")))  # the section only speaks for its own pipeline
