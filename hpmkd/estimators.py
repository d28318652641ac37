"""Classifiers that are not PyTorch networks, by name: scikit-learn's, and LightGBM / XGBoost / CatBoost when the
optional extra ``boosting`` is installed (``pip install 'hpmkd[boosting]'``).

:data:`ESTIMATORS` maps a teacher's ``model`` name (the estimator's class name, e.g. ``RandomForestClassifier``) to
an :class:`Estimator`: where its class lives, the extra that provides it, its safe file format, its defaults and
which of its options take the thread count and the seed. A teacher's ``options`` are the estimator's keyword
arguments, checked against its signature and, for scikit-learn, against its own parameter constraints
(:func:`check_options`), before anything runs.

Files (:data:`FORMATS`) are never pickles: scikit-learn estimators are written with ``skops`` and read back with only
scikit-learn, NumPy and SciPy types trusted (:func:`read_skops`); the boosters use their own model files (LightGBM's
text model, XGBoost's UBJSON, CatBoost's ``cbm``). Whatever the format, :func:`predict_log_proba` serves
``log p(y | x)`` from ``predict_proba`` on at most ``threads`` CPU threads (the estimator's own thread option and
the OpenMP/BLAS pools, ``threadpoolctl``).
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hpmkd.registry import ConfigError, Registry, did_you_mean, user_options

#: the optional extra that installs LightGBM, XGBoost and CatBoost (pyproject.toml)
BOOSTING_EXTRA = "boosting"

#: probabilities below this are raised to it (then renormalised) before the logarithm, so that no served output is
#: ``-inf`` (a tree's or a neighbour vote's exact zero would make KL terms undefined); our choice
PROB_FLOOR = 1e-6


@dataclass(frozen=True)
class Estimator:
    """One estimator class hpmkd can fit and serve as a teacher.

    ``module`` / ``cls``: where the class lives; ``package``: the distribution that provides it (named in the error
    when it is missing), ``extra``: the hpmkd extra that installs it (``None``: a core dependency); ``fmt``: its file
    format (:data:`FORMATS`); ``defaults``: options hpmkd sets unless the user does (quiet boosters, SVC's
    probabilities), ``fixed``: options the user may not change; ``threads`` / ``seed``: the option that takes the
    CPU thread count / the random seed (``None``: it has none).
    """

    module: str
    cls: str
    package: str
    fmt: str
    extra: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    threads: str | None = "n_jobs"
    seed: str | None = "random_state"

    def estimator_class(self, path: str = "model") -> type:
        """The class, imported now; a :class:`ConfigError` naming the extra when its package is missing."""
        try:
            return getattr(importlib.import_module(self.module), self.cls)
        except ImportError as err:
            how = (f"install the optional extra: pip install 'hpmkd[{self.extra}]' (it pins {self.package} for "
                   f"Python 3.11)" if self.extra else f"install {self.package}")
            raise ConfigError(f"{path}: {self.cls} needs the package {self.package!r}, which is not installed "
                              f"({err}); {how}.") from None


ESTIMATORS: Registry[Estimator] = Registry("estimator")


def register(name: str, entry: Estimator) -> None:
    ESTIMATORS.register(name)(lambda: entry)


def entry_of(name: str, path: str = "model") -> Estimator:
    return ESTIMATORS.get(name, path)()


for _name, _module, _threads, _seed in (
        ("HistGradientBoostingClassifier", "sklearn.ensemble", None, "random_state"),  # OpenMP threads
        ("RandomForestClassifier", "sklearn.ensemble", "n_jobs", "random_state"),
        ("ExtraTreesClassifier", "sklearn.ensemble", "n_jobs", "random_state"),
        ("KNeighborsClassifier", "sklearn.neighbors", "n_jobs", None),
        ("MLPClassifier", "sklearn.neural_network", None, "random_state")):  # BLAS threads
    register(_name, Estimator(_module, _name, "scikit-learn", "skops", threads=_threads, seed=_seed))
register("LogisticRegression", Estimator("sklearn.linear_model", "LogisticRegression", "scikit-learn", "skops",
                                         defaults={"max_iter": 1000}, threads=None))
register("SVC", Estimator("sklearn.svm", "SVC", "scikit-learn", "skops", fixed={"probability": True}, threads=None))
register("LGBMClassifier", Estimator("lightgbm", "LGBMClassifier", "lightgbm==4.7.0", "lightgbm", BOOSTING_EXTRA,
                                     defaults={"verbose": -1}))
register("XGBClassifier", Estimator("xgboost", "XGBClassifier", "xgboost-cpu==3.2.0", "xgboost", BOOSTING_EXTRA))
register("CatBoostClassifier", Estimator("catboost", "CatBoostClassifier", "catboost==1.2.10", "catboost",
                                         BOOSTING_EXTRA, defaults={"verbose": False, "allow_writing_files": False},
                                         threads="thread_count", seed="random_seed"))


def check_options(name: str, options: dict[str, Any], path: str = "model") -> None:
    """``options`` are keyword arguments of estimator ``name`` (its signature), values it accepts (scikit-learn's
    own parameter constraints, checked without fitting) and none of its ``fixed`` options changed."""
    entry = entry_of(name, f"{path}.model")
    cls = entry.estimator_class(f"{path}.model")
    allowed = user_options(cls, ())
    for key, value in options.items():
        if allowed is not None and key not in allowed:
            raise ConfigError(f"{path}.options.{key}: unknown option of {name}.{did_you_mean(key, allowed)} "
                              f"Allowed: {', '.join(sorted(allowed))}.")
        if key in entry.fixed and value != entry.fixed[key]:
            raise ConfigError(f"{path}.options.{key}: a {name} teacher serves probabilities, so {key} is "
                              f"{entry.fixed[key]!r}; remove the option.")
    estimator = cls(**options)
    if hasattr(estimator, "_parameter_constraints"):  # scikit-learn's own constraints, checked without fitting
        try:
            estimator._validate_params()
        except ValueError as err:
            raise ConfigError(f"{path}.options: {name} rejects its options: {err}") from None


def build_estimator(name: str, options: dict[str, Any], *, threads: int = 1, seed: int | None = None) -> Any:
    """A fresh, unfitted estimator: hpmkd's defaults, the user's ``options``, the fixed options, and (unless the
    user set them) ``threads`` for its thread option and ``seed`` for its seed option."""
    entry = entry_of(name)
    auto = {}
    if entry.threads and entry.threads not in options:
        auto[entry.threads] = threads
    if entry.seed and seed is not None and entry.seed not in options:
        auto[entry.seed] = seed
    return entry.estimator_class()(**{**entry.defaults, **auto, **options, **entry.fixed})


def set_threads(name: str, estimator: Any, threads: int) -> Any:
    """Point the estimator's own thread option at ``threads`` (a loaded estimator serving in an actor)."""
    option = entry_of(name).threads
    if option and hasattr(estimator, "set_params"):
        estimator.set_params(**{option: threads})
    return estimator


def predict_log_proba(estimator: Any, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """``log p(y | x)`` ``[N, C]`` float32 from ``estimator.predict_proba`` (rows flattened to ``[N, D]``), on at
    most ``threads`` OpenMP/BLAS threads; probabilities below :data:`PROB_FLOOR` are raised to it and the rows
    renormalised before the logarithm."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=max(1, threads)):
        rows = np.array(x, dtype=np.float32).reshape(len(x), -1)  # a writable copy: some estimators need one
        probs = np.asarray(estimator.predict_proba(rows), np.float64)
    probs = np.maximum(probs, PROB_FLOOR)
    return np.log(probs / probs.sum(1, keepdims=True)).astype(np.float32)


# --- files ---------------------------------------------------------------------------------------------------------

#: module prefixes of the types a skops file may hold (anything else is refused before it is built)
TRUSTED_MODULES = ("sklearn.", "numpy.", "scipy.")


@dataclass(frozen=True)
class Format:
    """A safe estimator file format: its file suffix, how to write, read and size an estimator."""

    suffix: str
    save: Callable[[Any, str], None]
    load: Callable[[str], Any]


def save_skops(estimator: Any, path: str) -> None:
    import skops.io as sio

    sio.dump(estimator, path)


def read_skops(path: str) -> Any:
    """A skops file, built with only scikit-learn, NumPy and SciPy types (:data:`TRUSTED_MODULES`); a file that
    holds any other type is refused, naming it, before anything in it is built."""
    import skops.io as sio

    untrusted = sio.get_untrusted_types(file=path)
    foreign = [t for t in untrusted if not t.startswith(TRUSTED_MODULES)]
    if foreign:
        raise ValueError(f"{path}: the estimator file holds types hpmkd does not trust ({', '.join(foreign)}); only "
                         f"scikit-learn, NumPy and SciPy types are loaded. Refit the teacher with hpmkd.")
    return sio.load(path, trusted=untrusted)


class LightGBMModel:
    """A LightGBM booster read from its text model file, with ``predict_proba`` (and ``set_params(n_jobs=)``)."""

    def __init__(self, path: str):
        import lightgbm

        self.booster = lightgbm.Booster(model_file=path)
        self.n_jobs = 1

    def set_params(self, n_jobs: int = 1, **_: Any) -> "LightGBMModel":
        self.n_jobs = n_jobs
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = np.asarray(self.booster.predict(x, num_threads=self.n_jobs))
        return np.stack([1 - p, p], 1) if p.ndim == 1 else p


def load_xgboost(path: str) -> Any:
    import xgboost

    model = xgboost.XGBClassifier()
    model.load_model(path)
    return model


def load_catboost(path: str) -> Any:
    import catboost

    return catboost.CatBoostClassifier().load_model(path, format="cbm")


FORMATS: dict[str, Format] = {
    "skops": Format(".skops", save_skops, read_skops),
    "lightgbm": Format(".lgbm.txt", lambda e, p: e.booster_.save_model(p), LightGBMModel),
    "xgboost": Format(".xgb.ubj", lambda e, p: e.save_model(p), load_xgboost),
    "catboost": Format(".cbm", lambda e, p: e.save_model(p, format="cbm"), load_catboost),
}


def file_name(name: str) -> str:
    """The file name a fitted estimator ``name`` is saved under (its format's suffix)."""
    return f"model{FORMATS[entry_of(name).fmt].suffix}"


def save_estimator(name: str, estimator: Any, path: str | os.PathLike) -> None:
    """Write ``estimator`` in its safe format, atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    FORMATS[entry_of(name).fmt].save(estimator, str(tmp))
    os.replace(tmp, path)


def load_estimator(path: str | os.PathLike) -> tuple[str, Any]:
    """``(name, fitted estimator)`` from ``path``, read safely (never unpickled) in the format its suffix names
    (:data:`FORMATS`); a skops file must hold one of :data:`ESTIMATORS`."""
    fmt_name = next((n for n, f in FORMATS.items() if str(path).endswith(f.suffix)), None)
    if fmt_name is None:
        raise ValueError(f"{path}: not an estimator file hpmkd reads (suffixes: "
                         f"{', '.join(f.suffix for f in FORMATS.values())}).")
    estimator = FORMATS[fmt_name].load(str(path))
    if fmt_name == "skops":
        name = type(estimator).__name__
        if name not in ESTIMATORS or entry_of(name).fmt != "skops":
            raise ValueError(f"{path}: holds a {name}, which is not an estimator hpmkd serves.")
        return name, estimator
    return next(n for n in ESTIMATORS.names() if entry_of(n).fmt == fmt_name), estimator


def stored_numbers(obj: Any, seen: dict[int, Any] | None = None) -> int:
    """How many numbers a fitted estimator stores: the elements of every array in its state (a structured array's
    fields each count), recursively; an opaque byte buffer (a booster's serialised model) counts as 4-byte
    numbers. What hpmkd reports as a non-PyTorch teacher's ``params`` (compression, the optimisation memory)."""
    seen = {} if seen is None else seen
    if id(obj) in seen or obj is None or isinstance(obj, (bool, int, float, str, type)):
        return 0
    seen[id(obj)] = obj  # kept alive, so a temporary state's id is never reused while counting
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return sum(stored_numbers(o, seen) for o in obj.ravel())
        return int(obj.size) * (len(obj.dtype.names) if obj.dtype.names else 1)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj) // 4
    if isinstance(obj, (list, tuple, set)):
        return sum(stored_numbers(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(stored_numbers(v, seen) for v in obj.values())
    getstate = getattr(obj, "__getstate__", None)
    try:
        state = getstate() if getstate is not None else vars(obj)
    except TypeError:
        return 0
    return stored_numbers(state, seen) if state is not obj else 0


def estimator_size(estimator: Any, path: str | os.PathLike) -> int:
    """:func:`stored_numbers` of the estimator; for a model whose state is opaque to it, the size of its file in
    4-byte numbers (at least 1)."""
    return max(1, stored_numbers(estimator) or math.ceil(Path(path).stat().st_size / 4))
