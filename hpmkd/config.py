"""The experiment configuration: typed dataclasses loaded from YAML.

One YAML file describes one experiment: data, teachers, student, how each stage trains, the distillation recipe,
where Ray runs and where MLflow records. :func:`load_config` reads it with ``yaml.safe_load``, applies ``--set``
overrides, and validates everything that can be checked without starting Ray: unknown keys, types, value ranges,
model / loss / aggregator / schedule names and their options, and that checkpoint files exist.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from hpmkd.config_schema import convert, from_dict, join, set_path, to_dict
from hpmkd.registry import ConfigError, did_you_mean


def positive(path: str, **values: float) -> None:
    for key, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{join(path, key)}: must be > 0, got {value}.")


@dataclass
class DataConfig:
    """Which data set, where it is, and how it is split (train/val from the official train set, fixed by seed)."""

    name: str = "fashion_mnist"
    root: str | None = None
    val_fraction: float = 0.1
    max_train: int | None = None
    max_val: int | None = None
    max_test: int | None = None
    download: bool = False
    augment: str = "none"

    def check(self, path: str) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{join(path, 'val_fraction')}: must be between 0 and 1 (exclusive), got {self.val_fraction}.")
        positive(path, max_train=self.max_train, max_val=self.max_val, max_test=self.max_test)

    def loader_kwargs(self, seed: int) -> dict[str, Any]:
        """Keyword arguments for :func:`hpmkd.data.load_dataset`."""
        return dict(
            root=self.root,
            seed=seed,
            val_fraction=self.val_fraction,
            max_train=self.max_train,
            max_val=self.max_val,
            max_test=self.max_test,
            download=self.download,
        )


@dataclass
class TrainConfig:
    """How one training stage optimises: used by teachers, the student alone and distillation stages."""

    epochs: int = 5
    batch_size: int = 128
    eval_batch_size: int = 1024
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    lr_milestones: list[float] = field(default_factory=lambda: [0.625, 0.75, 0.875])
    lr_gamma: float = 0.1
    warmup_epochs: int = 0

    def check(self, path: str) -> None:
        positive(path, epochs=self.epochs, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size, lr=self.lr)
        if self.weight_decay < 0:
            raise ConfigError(f"{join(path, 'weight_decay')}: must be >= 0, got {self.weight_decay}.")
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ConfigError(f"{join(path, 'lr_milestones')}: fractions of training in (0, 1), got {self.lr_milestones}.")


@dataclass
class ModelConfig:
    """A model from the registry (:func:`hpmkd.models.create_model`) and its keyword options."""

    model: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    """A teacher: trained by a ``train_teacher`` stage, or loaded from ``checkpoint`` (a ``state.pt`` or state dict)."""

    name: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    train: dict[str, Any] = field(default_factory=dict)

    def check(self, path: str) -> None:
        if self.checkpoint is not None and not Path(self.checkpoint).expanduser().is_file():
            raise ConfigError(
                f"{join(path, 'checkpoint')}: file {self.checkpoint!r} does not exist. Give the path of a checkpoint "
                f"written by a train_teacher stage (its MLflow artifact checkpoint/state.pt), or remove the key to train the teacher."
            )


@dataclass
class StudentConfig:
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class NamedOptions:
    """A registry entry chosen by ``name`` with its options (every other key)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DistillConfig:
    """The distillation recipe: explicit weights for every term (never an ambiguous ``alpha``).

    ``methods`` maps a loss name (:data:`hpmkd.losses.LOSSES`) to its options; each must have a ``weight``.
    ``aggregator`` combines several teachers (:data:`hpmkd.ensemble.AGGREGATORS`); ``temperature`` chooses a schedule
    (:data:`hpmkd.temperature.SCHEDULES`). ``train`` overrides the top-level ``train`` section for this stage.
    ``teacher_outputs``: ``online`` (teacher actors answer every batch), ``cache`` (logits computed once into the
    Arrow cache, see :mod:`hpmkd.logit_cache`; exact only without random augmentation and for logit methods), or
    ``auto`` (the cache whenever it is exact, online otherwise).
    """

    ce_weight: float = 0.1
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {"kd": {"weight": 0.9}})
    aggregator: dict[str, Any] = field(default_factory=lambda: {"name": "mean_logits"})
    temperature: dict[str, Any] = field(default_factory=lambda: {"schedule": "fixed", "T": 4.0})
    meta_interval: int = 20
    train: dict[str, Any] = field(default_factory=dict)
    baseline: bool = True
    teacher_outputs: Literal["auto", "online", "cache"] = "auto"
    cache_dtype: Literal["float16", "float32"] = "float16"
    cache_top_k: int | None = None

    def check(self, path: str) -> None:
        if self.ce_weight < 0:
            raise ConfigError(f"{join(path, 'ce_weight')}: must be >= 0, got {self.ce_weight}.")
        if not self.methods and self.ce_weight == 0:
            raise ConfigError(f"{join(path, 'methods')}: no loss at all (no methods and ce_weight 0).")
        for name, options in self.methods.items():
            if not isinstance(options, dict) or "weight" not in options:
                raise ConfigError(
                    f"{join(path, 'methods')}.{name}: every method needs an explicit weight, e.g. "
                    f"methods: {{{name}: {{weight: 1.0}}}}."
                )
            convert(float, options["weight"], f"{path}.methods.{name}.weight")
        if "name" not in self.aggregator:
            raise ConfigError(f"{join(path, 'aggregator')}: needs a name, e.g. aggregator: {{name: mean_logits}}.")
        if "schedule" not in self.temperature:
            raise ConfigError(f"{join(path, 'temperature')}: needs a schedule, e.g. temperature: {{schedule: fixed, T: 4}}.")
        positive(path, meta_interval=self.meta_interval, cache_top_k=self.cache_top_k)

    def method_options(self) -> dict[str, tuple[float, dict[str, Any]]]:
        """``{loss name: (weight, options without weight)}``."""
        return {
            name: (float(opts["weight"]), {k: v for k, v in opts.items() if k != "weight"})
            for name, opts in self.methods.items()
        }

    def aggregator_choice(self) -> NamedOptions:
        return NamedOptions(self.aggregator["name"], {k: v for k, v in self.aggregator.items() if k != "name"})

    def temperature_choice(self) -> NamedOptions:
        return NamedOptions(self.temperature["schedule"], {k: v for k, v in self.temperature.items() if k != "schedule"})


@dataclass
class RayConfig:
    """Where and how stages run. ``address: null`` starts a local Ray (or joins ``$RAY_ADDRESS`` when set)."""

    address: str | None = None
    num_cpus: int | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    teacher_cpus: float = 0.5
    teacher_gpus: float = 0.0
    storage_path: str | None = None
    max_failures: int = 1
    parallel: bool = True
    log_to_driver: bool = False

    def check(self, path: str) -> None:
        positive(path, num_workers=self.num_workers, cpus_per_worker=self.cpus_per_worker)
        if self.max_failures < 0:
            raise ConfigError(f"{join(path, 'max_failures')}: must be >= 0, got {self.max_failures}.")


@dataclass
class MlflowConfig:
    """Where runs are recorded. ``tracking_uri: null`` uses ``$MLFLOW_TRACKING_URI`` or ``sqlite:///./mlflow.db``."""

    tracking_uri: str | None = None
    artifact_root: str | None = None
    log_models: bool = True


@dataclass
class ExperimentConfig:
    """A whole experiment (see ``conf/default.yaml`` for a commented example).

    ``reuse``: a stage whose content key (settings, inputs, data fingerprint, code version) matches a finished stage
    run in the MLflow store is not recomputed; its recorded outputs are reused.
    """

    experiment: str
    pipeline: str
    teachers: list[TeacherConfig]
    student: StudentConfig
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    output_dir: str = "hpmkd_runs"
    cache_dir: str | None = None
    reuse: bool = True

    def check(self, path: str) -> None:
        if not self.teachers:
            raise ConfigError("teachers: at least one teacher is needed.")
        if self.distill.teacher_outputs == "cache" and self.data.augment != "none":
            raise ConfigError(
                f"distill.teacher_outputs: 'cache' serves logits of one fixed view, but data.augment is "
                f"{self.data.augment!r} (a new random view every epoch). Use teacher_outputs: online (or auto)."
            )
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ConfigError(f"teachers: names must be unique, got {names}.")

    def teacher_train(self, index: int) -> TrainConfig:
        return merged_train(self.train, self.teachers[index].train, f"teachers.{index}.train")

    def student_train(self) -> TrainConfig:
        return merged_train(self.train, self.student.train, "student.train")

    def distill_train(self) -> TrainConfig:
        return merged_train(self.train, self.distill.train, "distill.train")

    def as_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def cache_root(self) -> Path:
        """Where logit-cache entries live (shared storage on a multi-node cluster)."""
        return Path(self.cache_dir or Path(self.output_dir) / "logit_cache").expanduser().resolve()


def merged_train(base: TrainConfig, overrides: dict[str, Any], path: str) -> TrainConfig:
    """``base`` with the keys of ``overrides`` replaced, validated as a :class:`TrainConfig`."""
    merged = to_dict(base) | overrides
    return from_dict(TrainConfig, merged, path) if overrides else replace(base)


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=0.5"`` -> ``("a.b", 0.5)``; the value is parsed as YAML (``[1, 2]``, ``null``, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. --set distill.temperature.T=2.")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> ExperimentConfig:
    """Read, override and validate an experiment YAML. Raises :class:`ConfigError` or ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist. The shipped configs are in conf/ (e.g. conf/default.yaml).")
    with path.open() as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return config_from_data(data or {}, overrides)


def config_from_data(data: dict[str, Any], overrides: list[str] = ()) -> ExperimentConfig:
    data = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        set_path(data, key, value)
    cfg = from_dict(ExperimentConfig, data)
    check_names(cfg)
    return cfg


def check_names(cfg: ExperimentConfig) -> None:
    """Validate every registry name and option in ``cfg`` (models, data set, methods, aggregator, schedule, pipeline)."""
    from hpmkd.data import AUGMENTATIONS, DATASETS
    from hpmkd.ensemble import AGGREGATORS
    from hpmkd.losses import LOSSES
    from hpmkd.models import list_models
    from hpmkd.temperature import SCHEDULES

    models = set(list_models())

    def check_model_name(name: str, path: str) -> None:
        if name not in models:
            raise ConfigError(f"{path}: unknown model {name!r}.{did_you_mean(name, models)} See `hpmkd models` for the list.")

    DATASETS.get(cfg.data.name, "data.name")
    AUGMENTATIONS.get(cfg.data.augment, "data.augment")
    for i, teacher in enumerate(cfg.teachers):
        check_model_name(teacher.model, f"teachers.{i}.model")
        cfg.teacher_train(i)
    check_model_name(cfg.student.model, "student.model")
    cfg.student_train()
    cfg.distill_train()
    for name, (_, options) in cfg.distill.method_options().items():
        LOSSES.check_options(name, options, f"distill.methods.{name}", LOSS_CONTEXT)
    agg = cfg.distill.aggregator_choice()
    AGGREGATORS.check_options(agg.name, agg.options, "distill.aggregator", AGGREGATOR_CONTEXT)
    sched = cfg.distill.temperature_choice()
    SCHEDULES.check_options(sched.name, sched.options, "distill.temperature")


#: keyword arguments hpmkd passes to every loss / aggregator itself (not user options)
LOSS_CONTEXT = ("num_classes", "num_teachers", "num_train", "student_taps", "teacher_taps")
AGGREGATOR_CONTEXT = ("num_teachers", "num_classes", "input_shape")
