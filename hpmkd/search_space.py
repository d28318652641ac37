"""What the adaptive configuration manager tunes: the ``config_manager`` section, its hyperparameters and their space.

A hyperparameter is a named knob with a published default, a default search range and the config keys a value
sets. :data:`HYPERPARAMETERS` holds the ones HPM-KD's configuration manager tunes (Haase & Dourado da Silva, arXiv
2512.09886, authors' draft ``04-methodology.tex``: T0 ∈ [2, 8], α ∈ [0, 1], lr ∈ [1e-5, 1e-2], wd ∈ [1e-6, 1e-3],
chain threshold ε ∈ [0.005, 0.05]); any other
numeric config key can be searched by giving its dotted path (``distill.methods.dkd.beta``) with explicit ``low`` /
``high``. The chain threshold is proposed (from the memory, or its published default) but not searched: a Tune trial
is one direct distillation, whose outcome does not depend on it.

| name | config keys it sets | published default (source) | default range |
|---|---|---|---|
| ``T`` | ``distill.temperature.T`` | 4 (Hinton KD; mdistiller / RepDistiller CIFAR) | [1, 8] |
| ``kd_share`` | ``distill.ce_weight`` = 1 − s, ``distill.methods.<m>.weight`` = s | 0.9 (CE 0.1 / KD 0.9) | [0, 1] |
| ``lr`` | ``distill.train.lr`` | 0.05 SGD (RepDistiller); 1e-3 Adam/AdamW (HPM-KD) | default ÷10 … ×10, log |
| ``weight_decay`` | ``distill.train.weight_decay`` | 5e-4 (RepDistiller) | [1e-6, 1e-3], log (HPM-KD) |
| ``chain_threshold`` | ``chain.epsilon`` | 0.01 (HPM-KD) | proposed only, when ``chain.epsilon`` is set |

Sources of the defaults: Hinton KD (Hinton, Vinyals, Dean 2015, arXiv 1503.02531) with ``T = 4`` as in the CIFAR
configs of mdistiller (``megvii-research/mdistiller``) and RepDistiller (``HobbitLong/RepDistiller``), CE weight 0.1
and KD weight 0.9 as in mdistiller's CIFAR config; SGD lr 0.05 and weight decay 5e-4 from the RepDistiller CIFAR-100
protocol; HPM-KD (Haase & Dourado da Silva, arXiv 2512.09886): Adam 1e-3, the ranges and the chain threshold ε
(typically 0.01) from the authors' draft.

``kd_share`` is HPM-KD's α written with hpmkd's explicit weights (never an ``alpha`` key): the convex split between
the label loss and the distillation method ``m`` (``kd`` when present, otherwise the only method, or the ``method``
option). Our choices: T's range starts at 1 (the paper's starts at 2); lr's range is a decade either side of the
published default for the configured optimiser, because the paper's range is for Adam.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from hpmkd.config import SECTIONS, check_recipe
from hpmkd.config_schema import join
from hpmkd.registry import ConfigError, did_you_mean

SECTION = "config_manager"
log = logging.getLogger("hpmkd")


@dataclass(frozen=True)
class Hyperparameter:
    """A tunable knob: how to read it from a config, which keys a value sets, its published default and range."""

    name: str
    log: bool
    source: str
    published: Callable[[Any], float]
    #: the default range for an experiment; ``None``: the hyperparameter has no valid value in this recipe
    bounds: Callable[[Any], tuple[float, float] | None]
    read: Callable[[Any, str | None], float | None]
    overrides: Callable[[float, str | None], dict[str, Any]]
    searchable: bool = True
    #: the default range before the recipe's limits (said when :attr:`bounds` narrows it); ``None``: never narrowed
    nominal: tuple[float, float] | None = None


HYPERPARAMETERS: dict[str, Hyperparameter] = {}


def register(hp: Hyperparameter) -> Hyperparameter:
    if hp.name in HYPERPARAMETERS:
        raise KeyError(f"hyperparameter {hp.name!r} is registered twice")
    HYPERPARAMETERS[hp.name] = hp
    return hp


PUBLISHED_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}


def kd_method_name(names: list[str], method: str | None) -> str | None:
    """The method ``kd_share`` weighs: ``method`` if given, else ``kd`` if present, else the only one (else None)."""
    if method is not None:
        return method if method in names else None
    return "kd" if "kd" in names else names[0] if len(names) == 1 else None


def kd_share_read(cfg: Any, method: str | None) -> float | None:
    method = kd_method_name(list(cfg.distill.methods), method)
    if method is None:
        return None
    total = cfg.distill.ce_weight + float(cfg.distill.methods[method]["weight"])
    return float(cfg.distill.methods[method]["weight"]) / total if total > 0 else None


#: T's default range (our choice: the paper's [2, 8] widened down to 1), before the schedule's own limits
T_RANGE = (1.0, 8.0)


def temperature_bounds(cfg: Any) -> tuple[float, float] | None:
    """:data:`T_RANGE` within the initial temperatures the recipe's schedule accepts (``meta``: strictly inside its
    ``(T_min, T_max)``; ``loss_based``, ``convergence``: ``[T_min, T_max]``); ``None`` for a schedule without an
    initial ``T`` (``linear``, ``cosine``) or when nothing of the range is left."""
    from hpmkd.temperature import SCHEDULES

    choice = cfg.distill.temperature_choice()
    if choice.name not in SCHEDULES:
        return None
    admissible = SCHEDULES.get(choice.name).initial_range(**choice.options)
    if admissible is None:
        return None
    low, high = max(T_RANGE[0], admissible[0]), min(T_RANGE[1], admissible[1])
    return (low, high) if low < high else None


register(Hyperparameter(
    "T", False, "Hinton et al. 2015; mdistiller / RepDistiller CIFAR configs (T = 4)",
    published=lambda cfg: 4.0,
    bounds=temperature_bounds,
    nominal=T_RANGE,
    read=lambda cfg, _: cfg.distill.temperature.get("T"),
    overrides=lambda v, _: {"distill.temperature.T": v},
))
register(Hyperparameter(
    "kd_share", False, "Hinton KD as in mdistiller's CIFAR config: CE weight 0.1, KD weight 0.9",
    published=lambda cfg: 0.9,
    bounds=lambda cfg: (0.0, 1.0),
    read=kd_share_read,
    overrides=lambda v, method: {"distill.ce_weight": 1.0 - v, f"distill.methods.{method}.weight": v},
))
register(Hyperparameter(
    "lr", True, "RepDistiller CIFAR protocol (SGD 0.05); HPM-KD draft protocol (Adam 1e-3)",
    published=lambda cfg: PUBLISHED_LR[cfg.recipe().train.optimizer],
    bounds=lambda cfg: (PUBLISHED_LR[cfg.recipe().train.optimizer] / 10, PUBLISHED_LR[cfg.recipe().train.optimizer] * 10),
    read=lambda cfg, _: cfg.recipe().train.lr,
    overrides=lambda v, _: {"distill.train.lr": v},
))
register(Hyperparameter(
    "weight_decay", True, "RepDistiller CIFAR protocol (5e-4)",
    published=lambda cfg: 5e-4,
    bounds=lambda cfg: (1e-6, 1e-3),
    read=lambda cfg, _: cfg.recipe().train.weight_decay,
    overrides=lambda v, _: {"distill.train.weight_decay": v},
))
register(Hyperparameter(
    "chain_threshold", False, "HPM-KD chain stop rule, epsilon typically 0.01 (Haase & Dourado da Silva, arXiv 2512.09886)",
    published=lambda cfg: 0.01,
    bounds=lambda cfg: (0.005, 0.05),
    read=lambda cfg, _: cfg.chain.epsilon,
    overrides=lambda v, _: {"chain.epsilon": v},
    searchable=False,
))


def proposed_only(cfg: Any) -> list[Hyperparameter]:
    """The hyperparameters proposed but not searched that matter to ``cfg`` (``chain_threshold`` once the chain's
    epsilon rule is on): a trial is one direct distillation, so its outcome cannot tell their values apart."""
    return [hp for hp in HYPERPARAMETERS.values() if not hp.searchable and hp.read(cfg, None) is not None]


def get_path(data: Any, dotted: str) -> Any:
    """``data[a][b]`` for ``"a.b"``; ``None`` when a key is missing."""
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def path_hyperparameter(path: str) -> Hyperparameter:
    """Any numeric config key, searched by its dotted path; its default is the config's own value."""

    def read(cfg: Any, _: str | None) -> float | None:
        value = get_path(cfg.as_dict(), path)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def missing(cfg: Any) -> tuple[float, float]:
        raise ConfigError(f"{SECTION}.search_space.{path}: a config key path needs explicit low and high.")

    return Hyperparameter(path, False, "the experiment's own value", published=lambda cfg: read(cfg, None),
                          bounds=missing, read=read, overrides=lambda v, _: {path: v})


def hyperparameter(name: str, path: str) -> Hyperparameter:
    if name in HYPERPARAMETERS:
        return HYPERPARAMETERS[name]
    if "." in name:
        return path_hyperparameter(name)
    raise ConfigError(f"{path}: unknown hyperparameter {name!r}.{did_you_mean(name, HYPERPARAMETERS)} Known: "
                      f"{', '.join(HYPERPARAMETERS)}, or a dotted config key path such as distill.methods.dkd.beta.")


@dataclass
class SearchDimension:
    """One entry of ``config_manager.search_space``; every key is optional for a registered hyperparameter."""

    low: float | None = None
    high: float | None = None
    log: bool | None = None
    method: str | None = None  # kd_share only: the distillation method whose weight it sets


def default_search_space() -> dict[str, SearchDimension]:
    return {name: SearchDimension() for name, hp in HYPERPARAMETERS.items() if hp.searchable}


@SECTIONS.register(SECTION)
@dataclass
class ConfigManagerConfig:
    """The adaptive configuration manager (docs/config_manager.md): a ``tune`` stage before distillation.

    ``trials`` Tune trials (the first ``proposals`` of them seeded from the memory, or the published defaults) of
    ``budget_epochs`` epochs each (null: the distillation stage's epochs, its whole schedule) on a stratified
    ``trial_fraction`` of the training split (1: all of it; docs/config_manager.md), stopped early by ``scheduler``
    (``asha``: grace ``grace_period`` epochs, reduction factor ``reduction_factor``; ``fifo``: none), sampled by
    ``searcher`` (``random`` or ``optuna``). ``memory: false`` ignores past runs (cold start);
    ``memory_experiments`` restricts which MLflow experiments are searched (null: all in the store). Nearest
    neighbours (``neighbours`` tasks) answer while the memory is small; a gradient-boosted regressor once it has
    ``regressor_min_records`` records from ``regressor_min_tasks`` tasks. ``max_concurrent`` (null: as the
    cluster's CPUs allow) trials run at once, each with ``cpus_per_trial`` / ``gpus_per_trial``.
    """

    enabled: bool = False
    trials: int = 8
    budget_epochs: int | None = None
    trial_fraction: float = 1.0
    search_space: dict[str, SearchDimension] = field(default_factory=default_search_space)
    searcher: Literal["random", "optuna"] = "random"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    proposals: int = 3
    memory: bool = True
    memory_experiments: list[str] | None = None
    neighbours: int = 5
    regressor_min_records: int = 50
    regressor_min_tasks: int = 3
    max_concurrent: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 1

    def check(self, path: str) -> None:
        for key in ("trials", "budget_epochs", "grace_period", "neighbours", "regressor_min_records",
                    "regressor_min_tasks", "max_concurrent", "cpus_per_trial"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{join(path, key)}: must be > 0, got {value}.")
        if not 0 < self.trial_fraction <= 1:
            raise ConfigError(f"{join(path, 'trial_fraction')}: the share of the training split a trial trains on, "
                              f"in (0, 1], got {self.trial_fraction}.")
        if not 0 <= self.proposals <= self.trials:
            raise ConfigError(f"{join(path, 'proposals')}: between 0 and trials ({self.trials}), got {self.proposals}.")
        if self.reduction_factor <= 1:
            raise ConfigError(f"{join(path, 'reduction_factor')}: must be > 1, got {self.reduction_factor}.")
        for key in ("gpus_per_trial", "max_failures"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{join(path, key)}: must be >= 0, got {getattr(self, key)}.")
        if self.budget_epochs is not None and self.grace_period > self.budget_epochs:
            raise ConfigError(f"{join(path, 'grace_period')}: at most budget_epochs ({self.budget_epochs}), "
                              f"got {self.grace_period}.")
        if not self.search_space:
            raise ConfigError(f"{join(path, 'search_space')}: empty; name at least one hyperparameter, e.g. {{T: {{}}}}.")
        for name, dim in self.search_space.items():
            if not hyperparameter(name, join(path, "search_space")).searchable:
                raise ConfigError(f"{path}.search_space.{name}: proposed, not searched (a trial is one direct "
                                  f"distillation, whose outcome does not depend on it); drop it from the search space.")
            if dim.method is not None and name != "kd_share":
                raise ConfigError(f"{path}.search_space.{name}.method: only kd_share takes a method.")
        if self.searcher == "optuna" and importlib.util.find_spec("optuna") is None:
            raise ConfigError(f"{join(path, 'searcher')}: 'optuna' needs the optuna package (pip install optuna), "
                              f"or use searcher: random.")

    def check_with(self, cfg: Any) -> None:
        """With the manager enabled, both ends of every searched range must give a valid recipe (a temperature option
        the schedule lacks, an initial ``T`` outside the schedule's range, a method that is not configured: reported
        here, before Ray starts)."""
        if not self.enabled:
            return
        space = build_space(cfg)
        for note in space.notes:
            log.warning("%s", note)
        for dim in space.dims:
            for value in (dim.low, dim.high):
                try:
                    check_recipe(cfg.with_overrides(dim.overrides(value)).recipe(), "distill")
                except ConfigError as err:
                    raise ConfigError(f"{SECTION}.search_space.{dim.name}: at {value} it sets {err} "
                                      f"Change the range, or drop {dim.name} from the search space.") from err


@dataclass(frozen=True)
class Dimension:
    """A hyperparameter resolved against one experiment: its range, scale, published default and method."""

    hp: Hyperparameter
    low: float
    high: float
    log: bool
    default: float
    method: str | None

    @property
    def name(self) -> str:
        return self.hp.name

    def clip(self, value: float) -> float:
        return min(max(float(value), self.low), self.high)

    def to_unit(self, value: float) -> float:
        """``value`` mapped to [0, 1] (on the log scale for a log dimension)."""
        lo, hi, v = (math.log(self.low), math.log(self.high), math.log(self.clip(value))) if self.log else \
            (self.low, self.high, self.clip(value))
        return (v - lo) / (hi - lo)

    def overrides(self, value: float) -> dict[str, Any]:
        return self.hp.overrides(float(value), self.method)

    def from_unit(self, u: float) -> float:
        u = min(max(float(u), 0.0), 1.0)
        if self.log:
            return math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        return self.low + u * (self.high - self.low)


@dataclass(frozen=True)
class SearchSpace:
    """The resolved ``config_manager.search_space`` of one experiment."""

    dims: tuple[Dimension, ...]
    #: what resolving the space changed from the entries as written (a default range narrowed to the recipe's)
    notes: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dims)

    def overrides(self, values: dict[str, float]) -> dict[str, Any]:
        """The config key paths a configuration sets (``{"distill.temperature.T": 2.5, ...}``)."""
        out: dict[str, Any] = {}
        for d in self.dims:
            out.update(d.overrides(values[d.name]))
        return out

    def defaults(self) -> dict[str, float]:
        return {d.name: d.default for d in self.dims}

    def clip(self, values: dict[str, float]) -> dict[str, float]:
        return {d.name: d.clip(values[d.name]) for d in self.dims}

    def to_unit(self, values: dict[str, float]) -> np.ndarray:
        return np.array([d.to_unit(values[d.name]) for d in self.dims], dtype=np.float64)

    def from_unit(self, unit: np.ndarray) -> dict[str, float]:
        return {d.name: d.from_unit(u) for d, u in zip(self.dims, unit)}


def kd_method(cfg: Any, method: str | None, path: str) -> str:
    """The distillation method whose weight ``kd_share`` sets (see module docstring)."""
    names = list(cfg.distill.methods)
    found = kd_method_name(names, method)
    if found is not None:
        return found
    if method is not None:
        raise ConfigError(f"{path}.method: {method!r} is not in distill.methods ({', '.join(names) or 'none'}).")
    raise ConfigError(f"{path}: kd_share splits the loss between CE and one method, but distill.methods has "
                      f"{names or 'none'}. Name the method (kd_share: {{method: <name>}}) or drop kd_share.")


def build_space(cfg: Any) -> SearchSpace:
    """Resolve ``cfg.config_manager.search_space`` against ``cfg``; :class:`ConfigError` names the bad entry.

    An end the entry does not give comes from the hyperparameter's default range for this recipe (``T``: within
    what the temperature schedule accepts, which :attr:`SearchSpace.notes` says when it narrows the range); a
    hyperparameter the recipe gives no default range (``T`` of a schedule without an initial ``T``) needs both."""
    dims, notes = [], []
    for name, entry in cfg.config_manager.search_space.items():
        path = f"{SECTION}.search_space.{name}"
        hp = hyperparameter(name, f"{SECTION}.search_space")
        low, high = entry.low, entry.high
        if low is None or high is None:
            ranged = hp.bounds(cfg)
            if ranged is None:
                raise ConfigError(f"{path}: the recipe ({describe_recipe(cfg)}) leaves {name} no default range to "
                                  f"search; remove {name} from config_manager.search_space (it is in the default "
                                  f"search space, so write the search space without it), or give low and high.")
            if hp.nominal is not None and ranged != hp.nominal:
                notes.append(f"{path}: default range {list(hp.nominal)} narrowed to [{ranged[0]:g}, {ranged[1]:g}] "
                             f"by the recipe ({describe_recipe(cfg)}).")
            low, high = ranged[0] if low is None else low, ranged[1] if high is None else high
        log = hp.log if entry.log is None else entry.log
        if not low < high:
            raise ConfigError(f"{path}: low must be below high, got [{low}, {high}].")
        if log and low <= 0:
            raise ConfigError(f"{path}: a log-scale range needs low > 0, got {low}.")
        method = kd_method(cfg, entry.method, path) if name == "kd_share" else None
        published = hp.published(cfg)
        default = (low + high) / 2 if published is None else min(max(published, low), high)
        dims.append(Dimension(hp, float(low), float(high), log, float(default), method))
    return SearchSpace(tuple(dims), tuple(notes))


def describe_recipe(cfg: Any) -> str:
    choice = cfg.distill.temperature_choice()
    return f"temperature schedule {choice.name} with {choice.options or 'its defaults'}"


def recorded_config(cfg: Any) -> dict[str, float]:
    """Every registered hyperparameter's value in ``cfg`` plus any searched config key path (what the memory keeps
    beside a stage's outcome)."""
    names = list(HYPERPARAMETERS) + [n for n in cfg.config_manager.search_space if n not in HYPERPARAMETERS]
    values = {}
    for name in names:
        entry = cfg.config_manager.search_space.get(name)
        value = hyperparameter(name, SECTION).read(cfg, entry.method if entry else None)
        if value is not None:
            values[name] = float(value)
    return values
