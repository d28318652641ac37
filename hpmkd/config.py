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

from hpmkd.ablation import ComponentsConfig
from hpmkd.config_schema import convert, from_dict, join, set_path, to_dict
from hpmkd.registry import ConfigError, did_you_mean
from hpmkd.search_space import ConfigManagerConfig, build_space


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
    ``teacher_outputs``: ``online`` (teacher actors answer every batch), ``cache`` (outputs computed once into the
    Arrow cache, see :mod:`hpmkd.logit_cache`; exact only without random augmentation), ``bank`` (``bank_views``
    augmented views per sample, regenerated from their seed, their outputs computed once; epoch ``e`` trains on
    view ``e mod bank_views``, see :mod:`hpmkd.data.views`), or ``auto`` (the fastest exact one, see
    ``components/teacher_outputs.py``). ``cache_features``: store the teacher features that feature methods read
    too (otherwise those methods are served online).
    """

    ce_weight: float = 0.1
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {"kd": {"weight": 0.9}})
    aggregator: dict[str, Any] = field(default_factory=lambda: {"name": "mean_logits"})
    temperature: dict[str, Any] = field(default_factory=lambda: {"schedule": "fixed", "T": 4.0})
    meta_interval: int = 20
    train: dict[str, Any] = field(default_factory=dict)
    baseline: bool = True
    teacher_outputs: Literal["auto", "online", "cache", "bank"] = "auto"
    bank_views: int | None = None
    cache_features: bool = False
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
        positive(path, meta_interval=self.meta_interval, cache_top_k=self.cache_top_k, bank_views=self.bank_views)

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
    """Where and how stages run. ``address: null`` starts a local Ray (or joins ``$RAY_ADDRESS`` when set).

    Teacher actors: ``teacher_replicas`` identical actors per teacher (requests go to them in turn), each with
    ``teacher_cpus`` CPUs and ``teacher_gpus`` GPUs (a fraction below 1 lets several teachers share one GPU).
    """

    address: str | None = None
    num_cpus: int | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    teacher_cpus: float = 0.5
    teacher_gpus: float = 0.0
    teacher_replicas: int = 1
    storage_path: str | None = None
    max_failures: int = 1
    parallel: bool = True
    log_to_driver: bool = False

    def check(self, path: str) -> None:
        positive(path, num_workers=self.num_workers, cpus_per_worker=self.cpus_per_worker,
                 teacher_replicas=self.teacher_replicas)
        if self.teacher_gpus < 0 or (self.teacher_gpus > 1 and not float(self.teacher_gpus).is_integer()):
            raise ConfigError(f"{join(path, 'teacher_gpus')}: GPUs per teacher actor must be a fraction in [0, 1] or a "
                              f"whole number (Ray's rule), got {self.teacher_gpus}; e.g. 0.25 puts 4 teachers on a GPU.")
        if self.max_failures < 0:
            raise ConfigError(f"{join(path, 'max_failures')}: must be >= 0, got {self.max_failures}.")


@dataclass
class MlflowConfig:
    """Where runs are recorded. ``tracking_uri: null`` uses ``$MLFLOW_TRACKING_URI`` or ``sqlite:///./mlflow.db``.

    ``log_models``: log every student stage's model as an MLflow model (teachers are kept as checkpoints).
    """

    tracking_uri: str | None = None
    artifact_root: str | None = None
    log_models: bool = True


@dataclass
class ChainConfig:
    """A progressive distillation chain ``f_T = f_0 → f_1 → … → f_L = f_S`` (pipeline ``takd``; see
    :mod:`hpmkd.chain` and docs/methods.md).

    ``assistants``: the intermediate models ``f_1 … f_{L−1}`` by hand, largest first (TAKD's teacher assistants);
    ``null`` plans them (:func:`hpmkd.chain.plan_chain`): sizes near ``|θ_T|·r^{i/L}`` in the student's family,
    ``L`` the fewest steps (at most ``max_steps``) whose every size ratio ``|θ_{i−1}|/|θ_i|`` is at most
    ``max_gap``, scaling ``width``, ``depth`` or ``both``. ``plan_from``: the teacher whose size is ``|θ_T|``
    (default: the largest). ``epsilon``: HPM-KD's stop rule (METHODS §3.2), ``null`` = off: after assistant
    ``i >= 2`` whose relative validation gain ``(Acc_i − Acc_{i−1})/Acc_{i−1}`` is below ε, the remaining assistants
    are skipped and the student distils from assistant ``i``.
    """

    assistants: list[ModelConfig] | None = None
    max_gap: float = 4.0
    max_steps: int = 6
    scale: Literal["width", "depth", "both"] = "both"
    plan_from: str | None = None
    epsilon: float | None = None

    def check(self, path: str) -> None:
        if not self.max_gap > 1:
            raise ConfigError(f"{join(path, 'max_gap')}: must be > 1 (the largest size ratio allowed between "
                              f"consecutive models of the chain), got {self.max_gap}.")
        positive(path, max_steps=self.max_steps)


@dataclass
class ReferenceConfig:
    """SMSKD's anchor to the frozen previous-stage student: the ``reference`` loss (hpmkd/losses/reference.py)
    with weight ``weight`` (λ_ref; 0 drops the anchor) and its options."""

    weight: float = 1.0
    mode: str = "one_minus_tcp"
    tau_ref: float = 4.0
    normalize: bool = False

    def check(self, path: str) -> None:
        if self.weight < 0:
            raise ConfigError(f"{join(path, 'weight')}: must be >= 0 (0 drops the reference anchor), got {self.weight}.")
        positive(path, tau_ref=self.tau_ref)


@dataclass
class SmskdConfig:
    """SMSKD (pipeline ``smskd``; METHODS §1): K sequential distillation stages, stage ``k`` starting from stage
    ``k−1``'s student (``init: previous``; ``scratch`` is the re-initialisation ablation) and anchored to a frozen copy
    of it by the ``reference`` loss (``reference``).

    ``stages``: one mapping per stage, of the ``distill`` keys that stage replaces (``methods`` required; also
    ``ce_weight``, ``aggregator``, ``temperature``, ``meta_interval``, ``train``). Keys a stage does not give come
    from the ``distill`` section.
    """

    stages: list[dict[str, Any]] = field(default_factory=list)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    init: Literal["previous", "scratch"] = "previous"

    #: distill keys a stage may replace (the teacher-output keys apply to every stage: set them under distill)
    STAGE_KEYS = ("ce_weight", "methods", "aggregator", "temperature", "meta_interval", "train")

    def check(self, path: str) -> None:
        for i, stage in enumerate(self.stages):
            where = join(path, f"stages.{i}")
            for key in stage:
                if key not in self.STAGE_KEYS:
                    raise ConfigError(f"{where}.{key}: not a per-stage key.{did_you_mean(str(key), self.STAGE_KEYS)} "
                                      f"A stage may replace: {', '.join(self.STAGE_KEYS)}; other distill keys apply to "
                                      f"every stage (set them in the distill section).")
            if not isinstance(stage.get("methods"), dict) or not stage["methods"]:
                raise ConfigError(f"{where}.methods: every SMSKD stage names its own KD method(s), e.g. "
                                  f"methods: {{fitnet: {{weight: 100}}}}.")
            if "reference" in stage["methods"]:
                raise ConfigError(f"{where}.methods.reference: SMSKD adds the frozen-reference loss to every stage "
                                  f"after the first itself; set its weight and mode under smskd.reference.")

    def paths(self) -> list[str]:
        """The key path of each stage (``smskd.stages.<k>``), which also names its recipe."""
        return [f"smskd.stages.{k}" for k in range(len(self.stages))]

    def recipes(self, base: DistillConfig) -> list[DistillConfig]:
        """Each stage's recipe: ``base`` with the stage's keys replaced; stages after the first also get the
        ``reference`` loss (unless its weight is 0)."""
        out = []
        for k, (stage, path) in enumerate(zip(self.stages, self.paths())):
            data = to_dict(base) | copy.deepcopy(stage)
            if k > 0 and self.reference.weight > 0:
                data["methods"] = {**data["methods"], "reference": to_dict(self.reference)}
            out.append(from_dict(DistillConfig, data, path))
        return out


@dataclass
class ExperimentConfig:
    """A whole experiment (see ``conf/default.yaml`` for a commented example).

    ``reuse``: a stage whose content key (settings, inputs, data fingerprint, code version) matches a finished stage
    run in the MLflow store is not recomputed; its recorded outputs are reused. ``config_manager``: a ``tune``
    stage that proposes and searches the distillation configuration (:class:`hpmkd.search_space.ConfigManagerConfig`).
    ``components``: HPM-KD's six components as switches; one that is ``false`` is replaced by its plain counterpart
    when the run starts (:func:`hpmkd.ablation.effective_config`).
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
    config_manager: ConfigManagerConfig = field(default_factory=ConfigManagerConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    smskd: SmskdConfig = field(default_factory=SmskdConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    output_dir: str = "hpmkd_runs"
    cache_dir: str | None = None
    reuse: bool = True

    def check(self, path: str) -> None:
        if not self.teachers:
            raise ConfigError("teachers: at least one teacher is needed.")
        if self.distill.teacher_outputs == "cache" and self.data.augment != "none":
            raise ConfigError(
                f"distill.teacher_outputs: 'cache' serves logits of one fixed view, but data.augment is "
                f"{self.data.augment!r} (a new random view every epoch). Use teacher_outputs: bank with "
                f"distill.bank_views: N (N stored views, replayed), online, or auto."
            )
        if self.distill.teacher_outputs == "bank" and self.data.augment == "none":
            raise ConfigError("distill.teacher_outputs: 'bank' replays randomly augmented views, but data.augment is "
                              "'none' (one fixed view). Use teacher_outputs: cache (or auto).")
        if self.distill.teacher_outputs == "bank" and self.distill.bank_views is None:
            raise ConfigError("distill.bank_views: teacher_outputs 'bank' needs the number of stored views per sample, "
                              "e.g. bank_views: 8 (epoch e trains on view e mod 8).")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ConfigError(f"teachers: names must be unique, got {names}.")
        if "reference" in self.distill.methods:
            raise ConfigError("distill.methods.reference: the reference loss anchors a student to the frozen student "
                              "of the previous SMSKD stage; use pipeline smskd and set it under smskd.reference.")
        if self.chain.plan_from is not None and self.chain.plan_from not in names:
            raise ConfigError(f"chain.plan_from: no teacher named {self.chain.plan_from!r}.{did_you_mean(self.chain.plan_from, names)} "
                              f"Teachers: {', '.join(names)}.")

    def teacher_train(self, index: int) -> TrainConfig:
        return merged_train(self.train, self.teachers[index].train, f"teachers.{index}.train")

    def student_train(self) -> TrainConfig:
        return merged_train(self.train, self.student.train, "student.train")

    def distill_train(self) -> TrainConfig:
        return merged_train(self.train, self.distill.train, "distill.train")

    def recipes(self) -> dict[str, DistillConfig]:
        """Every distillation recipe by its key path: ``distill``, and ``smskd.stages.<k>`` (see
        :meth:`SmskdConfig.recipes`). A stage names its recipe by this path (stage param ``recipe``)."""
        return {"distill": self.distill, **dict(zip(self.smskd.paths(), self.smskd.recipes(self.distill)))}

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
    check_search_space(cfg)
    return cfg


def with_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """``cfg`` with each dotted key path set to its value (as ``--set`` does), validated again."""
    if not overrides:
        return cfg
    data = cfg.as_dict()
    for key, value in overrides.items():
        set_path(data, key, value)
    out = from_dict(ExperimentConfig, data)
    check_names(out)
    return out


def check_search_space(cfg: ExperimentConfig) -> None:
    """With ``config_manager.enabled``, both ends of every searched range must give a valid config (a temperature
    option the schedule lacks, a method that is not configured: reported here, before Ray starts)."""
    if not cfg.config_manager.enabled:
        return
    for dim in build_space(cfg).dims:
        for value in (dim.low, dim.high):
            try:
                with_overrides(cfg, dim.overrides(value))
            except ConfigError as err:
                raise ConfigError(f"config_manager.search_space.{dim.name}: at {value} it sets {err} "
                                  f"Change the range, or drop {dim.name} from the search space.") from err


def check_names(cfg: ExperimentConfig) -> None:
    """Validate every registry name and option in ``cfg`` (models, data set, methods, aggregator, schedule, pipeline)."""
    from hpmkd.data import AUGMENTATIONS, DATASETS
    from hpmkd.ensemble import AGGREGATORS
    from hpmkd.losses import LOSSES
    from hpmkd.losses.reference import REFERENCE_WEIGHTS
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
    for i, assistant in enumerate(cfg.chain.assistants or []):
        check_model_name(assistant.model, f"chain.assistants.{i}.model")
    REFERENCE_WEIGHTS.get(cfg.smskd.reference.mode, "smskd.reference.mode")
    for path, recipe in cfg.recipes().items():
        merged_train(cfg.train, recipe.train, f"{path}.train")
        for name, (_, options) in recipe.method_options().items():
            LOSSES.check_options(name, options, f"{path}.methods.{name}", LOSS_CONTEXT)
        agg = recipe.aggregator_choice()
        AGGREGATORS.check_options(agg.name, agg.options, f"{path}.aggregator", AGGREGATOR_CONTEXT)
        sched = recipe.temperature_choice()
        SCHEDULES.check_options(sched.name, sched.options, f"{path}.temperature")


#: keyword arguments hpmkd passes to every loss / aggregator itself (not user options)
LOSS_CONTEXT = ("num_classes", "num_teachers", "num_train", "student_taps", "teacher_taps")
AGGREGATOR_CONTEXT = ("num_teachers", "num_classes", "input_shape")
