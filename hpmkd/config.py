"""The experiment configuration: typed dataclasses loaded from YAML.

One YAML file describes one experiment: data, teachers, student, how each stage trains, the distillation recipe,
where Ray runs and where MLflow records. :func:`load_config` reads it with :func:`hpmkd.safe_yaml.load_yaml`
(``yaml.safe_load`` without duplicate keys, with YAML 1.2 numbers and size limits), applies ``--set``
overrides, and validates everything that can be checked without starting Ray: unknown keys, types, value ranges,
model / loss / aggregator / schedule names and their options, and that checkpoint files exist.

The core sections are defined here. Every other top-level section is owned by the pipeline or component that reads
it and registered in :data:`SECTIONS` by its module (imported first, :data:`PLUGIN_MODULES`) (``chain`` by
:mod:`hpmkd.pipelines.chain`, ``smskd`` by :mod:`hpmkd.pipelines.smskd`, ``mtbkd`` by :mod:`hpmkd.pipelines.mtbkd`,
``config_manager`` by :mod:`hpmkd.search_space`, ``components`` by :mod:`hpmkd.pipelines.switches`, ``evaluation``
by :mod:`hpmkd.evaluation`): a new pipeline adds its section without editing this file. A section class is a
dataclass with defaults; it may define ``check(path)`` (its own values), ``check_with(cfg)`` (against the whole
experiment, after every section is parsed) and ``check_data(cfg, splits)`` (against the loaded data, in the
runner's preflight, before any stage runs).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from hpmkd.config_schema import convert, from_dict, join, replace_path, set_path, to_dict
from hpmkd.loss_schedule import LossSchedule
from hpmkd.models.ref import ModelRef
from hpmkd.registry import ConfigError, Registry, did_you_mean
from hpmkd.safe_yaml import MAX_BYTES, load_yaml


def positive(path: str, **values: float) -> None:
    for key, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{join(path, key)}: must be > 0, got {value}.")


def non_negative(path: str, **values: float) -> None:
    for key, value in values.items():
        if value is not None and value < 0:
            raise ConfigError(f"{join(path, key)}: must be >= 0, got {value}.")


#: what a name that becomes part of file names, MLflow keys and stage names may hold (teacher names)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class DataConfig:
    """Which data set, where it is, and how it is split (train/val from the official train set, fixed by seed).

    ``options``: the data set's own keyword options (a table's ``target`` column, an image folder's ``resize``),
    checked against its factory's signature (:data:`hpmkd.data.DATASETS`). ``meta_fraction``: the share of the
    training split held out as the meta split, the outer objective of a temperature learned from held-out data
    (``distill.temperature.schedule: meta``; :mod:`hpmkd.data.splits`); ``null`` lets the experiment choose
    (:func:`resolve_meta_split`: :data:`DEFAULT_META_FRACTION` where a recipe learns from held-out data, else none).
    ``split_seed``: the seed of the split plan (null: the experiment's ``seed``); fixed, every seed of an experiment
    trains on the same splits and only initialisation and batch order vary, as they must where teachers are given
    as checkpoints trained on those splits (a teacher must never have trained on another seed's validation split).
    ``reserve_train``: leave out of the training split the rows that ``max_train: reserve_train`` selects with the
    same split seed (:func:`hpmkd.data.splits.training_rows`): teachers trained with it never see a row of the
    training split of an experiment whose ``max_train`` is that number (``conf/humpkd_teachers.yaml``).
    """

    name: str = "fashion_mnist"
    root: str | None = None
    val_fraction: float = 0.1
    max_train: int | None = None
    max_val: int | None = None
    max_test: int | None = None
    download: bool = False
    augment: str = "none"
    options: dict[str, Any] = field(default_factory=dict)
    meta_fraction: float | None = None
    split_seed: int | None = None
    reserve_train: int | None = None

    def check(self, path: str) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{join(path, 'val_fraction')}: must be between 0 and 1 (exclusive), got {self.val_fraction}.")
        positive(path, max_train=self.max_train, max_val=self.max_val, max_test=self.max_test,
                 reserve_train=self.reserve_train)
        if self.split_seed is not None and self.split_seed < 0:
            raise ConfigError(f"{join(path, 'split_seed')}: a seed >= 0 (or null: the experiment's seed), "
                              f"got {self.split_seed}.")
        if self.meta_fraction is not None and not 0.0 <= self.meta_fraction < 1.0:
            raise ConfigError(f"{join(path, 'meta_fraction')}: the share of the training split held out for a "
                              f"temperature learned from held-out data, in [0, 1) (or null), got {self.meta_fraction}.")
        if self.root is not None:
            self.check_root(join(path, "root"))

    def check_root(self, path: str) -> None:
        """A given ``root`` is where the data are, and only there (no fallback to ``$HPMKD_DATA`` or the system
        folder): it must name an existing folder, unless ``download`` will create it. It is made absolute, since
        Ray Train workers run in other working folders."""
        if not self.root.strip():
            raise ConfigError(f"{path}: empty. Remove the key (or set it to null) to search $HPMKD_DATA and the "
                              f"system folder, or give the folder that holds the data set.")
        from hpmkd.data.storage import is_uri

        if is_uri(self.root):
            self.check_root_uri(path)
            return
        folder = Path(self.root).expanduser().resolve()
        if not self.download and not folder.is_dir():
            raise ConfigError(f"{path}: folder {self.root!r} does not exist ({folder}). Give the folder that holds "
                              f"the data set, set data.download: true to fetch it there, or remove data.root.")
        self.root = str(folder)

    def check_root_uri(self, path: str) -> None:
        """A ``root`` on shared storage (a file-system URI, :mod:`hpmkd.data.storage`): its file system opens here
        and the folder exists; downloads need a local folder."""
        from hpmkd.data.storage import data_path

        if self.download:
            raise ConfigError(f"{path}: {self.root!r} is a URI, and data.download writes to a local folder. Download "
                              f"once into a local folder (data.root: /path/to/folder, data.download: true), copy it to "
                              f"the shared storage, then set {path} to its URI with data.download: false.")
        if not data_path(self.root, path).is_dir():
            raise ConfigError(f"{path}: no folder at {self.root!r} on its file system. Give the URI of the folder "
                              f"that holds the data set (every node reads it), or a local folder.")

    def loader_kwargs(self, seed: int) -> dict[str, Any]:
        """Keyword arguments for :func:`hpmkd.data.load_dataset` in an experiment of seed ``seed``."""
        return dict(
            root=self.root,
            options=self.options,
            seed=seed if self.split_seed is None else self.split_seed,
            val_fraction=self.val_fraction,
            max_train=self.max_train,
            max_val=self.max_val,
            max_test=self.max_test,
            meta_fraction=self.meta_fraction or 0.0,
            reserve_train=self.reserve_train,
            download=self.download,
        )


@dataclass
class TrainConfig:
    """How one training stage optimises: used by teachers, the student alone and distillation stages.

    ``optimizer`` names an entry of :data:`hpmkd.optim.OPTIMIZERS` (``sgd``, ``adam``, ``adamw``, ``sgld``,
    ``psgld``; extra keyword options in ``optimizer_options``), ``lr_schedule`` one of
    :data:`hpmkd.optim.LR_SCHEDULES` (``cosine``, ``step``, ``constant``, ``cyclical``; its options in
    ``lr_schedule_options``)."""

    epochs: int = 5
    batch_size: int = 128
    eval_batch_size: int = 1024
    optimizer: str = "sgd"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    lr_schedule_options: dict[str, Any] = field(default_factory=dict)
    lr_milestones: list[float] = field(default_factory=lambda: [0.625, 0.75, 0.875])
    lr_gamma: float = 0.1
    warmup_epochs: int = 0

    def check(self, path: str) -> None:
        positive(path, epochs=self.epochs, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size, lr=self.lr,
                 lr_gamma=self.lr_gamma)
        non_negative(path, weight_decay=self.weight_decay, warmup_epochs=self.warmup_epochs)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{join(path, 'momentum')}: must be in [0, 1), got {self.momentum}.")
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ConfigError(f"{join(path, 'lr_milestones')}: fractions of training in (0, 1), got {self.lr_milestones}.")


@dataclass
class TeacherConfig:
    """A teacher: trained by a ``train_teacher`` stage, or loaded from ``checkpoint`` (a ``state.pt`` or state dict).
    ``sha256``: the checkpoint file's expected digest, verified before anything runs (a shipped checkpoint that
    its recipe reproduces bit for bit, ``conf/teachers.yaml``)."""

    name: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    sha256: str | None = None
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model, self.options)

    def check(self, path: str) -> None:
        if self.checkpoint is not None and not Path(self.checkpoint).expanduser().is_file():
            raise ConfigError(
                f"{join(path, 'checkpoint')}: file {self.checkpoint!r} does not exist. Give the path of a checkpoint "
                f"written by a train_teacher stage (its MLflow artifact checkpoint/state.pt), or remove the key to train the teacher."
            )
        if self.sha256 is not None:
            self.check_digest(path)

    def check_digest(self, path: str) -> None:
        from hpmkd.checkpoint import file_digest

        if self.checkpoint is None:
            raise ConfigError(f"{join(path, 'sha256')}: the digest of a teacher checkpoint, but the teacher has no "
                              f"checkpoint; give {join(path, 'checkpoint')} or remove sha256.")
        found = file_digest(Path(self.checkpoint).expanduser())
        if found != self.sha256.lower():
            raise ConfigError(f"{join(path, 'checkpoint')}: {self.checkpoint!r} has sha256 {found}, not the expected "
                              f"{self.sha256} ({join(path, 'sha256')}): the file is not the teacher this config was "
                              f"written for. Restore it, or rebuild it with the config that made it.")


@dataclass
class StudentConfig:
    """The student: a model (:class:`~hpmkd.models.ref.ModelRef`) and, in ``train``, keys of the top-level ``train``
    section it replaces when trained alone."""

    model: str
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model, self.options)


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
    too (otherwise those methods are served online). ``schedule``: which methods are active, with what weight, by
    fraction of training (:mod:`hpmkd.loss_schedule`; ``null``: every method at its weight throughout).
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
    schedule: LossSchedule | None = None

    def check(self, path: str) -> None:
        non_negative(path, ce_weight=self.ce_weight)
        for name, options in self.methods.items():
            if not isinstance(options, dict) or "weight" not in options:
                raise ConfigError(
                    f"{join(path, 'methods')}.{name}: every method needs an explicit weight, e.g. "
                    f"methods: {{{name}: {{weight: 1.0}}}}."
                )
            weight = convert(float, options["weight"], f"{path}.methods.{name}.weight")
            non_negative(f"{path}.methods.{name}", weight=weight)
        if self.ce_weight == 0 and all(float(o["weight"]) == 0 for o in self.methods.values()):
            raise ConfigError(f"{join(path, 'methods')}: every loss weight is 0 (ce_weight and each method's weight), "
                              f"so nothing would be learned; give at least one a positive weight, e.g. ce_weight: 0.1.")
        if "name" not in self.aggregator:
            raise ConfigError(f"{join(path, 'aggregator')}: needs a name, e.g. aggregator: {{name: mean_logits}}.")
        if "schedule" not in self.temperature:
            raise ConfigError(f"{join(path, 'temperature')}: needs a schedule, e.g. temperature: {{schedule: fixed, T: 4}}.")
        positive(path, meta_interval=self.meta_interval, cache_top_k=self.cache_top_k, bank_views=self.bank_views)
        if self.schedule is not None:
            self.schedule.check_methods(list(self.methods), join(path, "schedule"))

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


#: the orders in which ready stages may start (``ray.order``)
STAGE_ORDERS = ("critical_path", "listed")
#: how missing logit-cache entries are computed (:mod:`hpmkd.components.cache_fill`)
CACHE_FILLS = ("actors", "tasks", "ray_data", "auto")
#: what runs a training stage (:mod:`hpmkd.components.stage_runner`)
EXECUTORS = ("auto", "task", "train")


@dataclass
class RayConfig:
    """Where and how stages run. ``address: null`` starts a local Ray (or joins ``$RAY_ADDRESS`` when set), whose
    every port listens on ``bind_host`` only (default 127.0.0.1: this machine; see
    :mod:`hpmkd.components.ray_runtime`).

    Teacher actors: ``teacher_replicas`` identical actors per teacher (requests go to them in turn), each with
    ``teacher_cpus`` CPUs and ``teacher_gpus`` GPUs (a fraction below 1 lets several teachers share one GPU).

    ``order``: which ready stage starts first when not all fit: ``critical_path`` (the longest expected chain of
    stages first, durations estimated from the store's past runs; :mod:`hpmkd.components.scheduler`) or ``listed``
    (the pipeline's order). ``share_splits``: Ray Train workers read the driver's loaded splits from Ray's object
    store (loaded once per experiment); false: every worker loads the data set from its own node's disk (a data set
    too large to pass through the object store, kept on each node's storage).

    ``cache_fill``: how missing logit-cache entries are computed: ``tasks`` (Ray tasks on Ray's pooled worker
    processes, which the stage's own training task then finds warm; the default), ``actors`` (the teacher actors,
    driven by the driver), ``ray_data`` (Ray Data ``map_batches`` over an actor pool of each teacher, shards streamed
    to the cache root) or ``auto`` (``ray_data`` on a cluster of several nodes, else ``tasks``); see
    :mod:`hpmkd.components.cache_fill`.

    ``executor``: what runs a training stage: ``task`` (one Ray task in a pooled worker process: no Ray Train start-up,
    one worker only), ``train`` (a Ray Train ``TorchTrainer``, any number of workers) or ``auto`` (``task`` for one
    worker, ``train`` for several); both train bit for bit the same (:mod:`hpmkd.components.stage_runner`).
    """

    address: str | None = None
    bind_host: str = "127.0.0.1"
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
    order: str = "critical_path"
    share_splits: bool = True
    cache_fill: str = "tasks"
    executor: str = "auto"

    def check(self, path: str) -> None:
        positive(path, num_workers=self.num_workers, cpus_per_worker=self.cpus_per_worker,
                 teacher_replicas=self.teacher_replicas, num_cpus=self.num_cpus)
        non_negative(path, teacher_cpus=self.teacher_cpus)
        if self.bind_host != "localhost":
            try:
                ipaddress.ip_address(self.bind_host)
            except ValueError:
                raise ConfigError(f"{join(path, 'bind_host')}: {self.bind_host!r} is not an IP address; give "
                                  f"127.0.0.1 (this machine only, the default) or this machine's address.") from None
        if self.teacher_gpus < 0 or (self.teacher_gpus > 1 and not float(self.teacher_gpus).is_integer()):
            raise ConfigError(f"{join(path, 'teacher_gpus')}: GPUs per teacher actor must be a fraction in [0, 1] or a "
                              f"whole number (Ray's rule), got {self.teacher_gpus}; e.g. 0.25 puts 4 teachers on a GPU.")
        if self.max_failures < 0:
            raise ConfigError(f"{join(path, 'max_failures')}: must be >= 0, got {self.max_failures}.")
        if self.order not in STAGE_ORDERS:
            raise ConfigError(f"{join(path, 'order')}: {self.order!r} is not a stage order; give one of "
                              f"{', '.join(STAGE_ORDERS)}.")
        if self.cache_fill not in CACHE_FILLS:
            raise ConfigError(f"{join(path, 'cache_fill')}: {self.cache_fill!r} is not a way to fill the logit cache; "
                              f"give one of {', '.join(CACHE_FILLS)} (tasks: Ray tasks on Ray's pooled worker "
                              f"processes, the default; actors: the teacher actors; "
                              f"ray_data: Ray Data map_batches over an actor pool per teacher).")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"{join(path, 'executor')}: {self.executor!r} is not a stage executor; give one of "
                              f"{', '.join(EXECUTORS)} (auto: a Ray task for one worker, Ray Train for several).")
        if self.executor == "task" and self.num_workers > 1:
            raise ConfigError(f"{join(path, 'executor')}: 'task' runs one worker, and ray.num_workers is "
                              f"{self.num_workers}; use executor 'train' (or 'auto') for several workers, or set "
                              f"ray.num_workers=1.")


@dataclass
class MlflowConfig:
    """Where runs are recorded. ``tracking_uri: null`` uses ``$MLFLOW_TRACKING_URI`` or ``sqlite:///./mlflow.db``.

    ``log_models``: log every student stage's model as an MLflow model (teachers are kept as checkpoints).
    """

    tracking_uri: str | None = None
    artifact_root: str | None = None
    log_models: bool = True


@dataclass(frozen=True)
class Recipe:
    """One distillation stage's recipe, resolved when the stage graph is built: the ``distill`` keys it uses and its
    complete training settings (the top-level ``train`` with the recipe's ``train`` keys replaced)."""

    distill: DistillConfig
    train: TrainConfig

    def with_overrides(self, overrides: dict[str, Any]) -> "Recipe":
        """The recipe with config key paths set (``distill.temperature.T``, ``distill.train.lr``: what a ``tune``
        stage hands on); paths outside ``distill`` are not the recipe's and are ignored."""
        recipe = self
        for path, value in overrides.items():
            section, _, rest = path.partition(".")
            if section != "distill":
                continue
            if rest.startswith("train."):
                recipe = replace(recipe, train=replace_path(recipe.train, rest[len("train."):], value, "distill.train"))
            else:
                recipe = replace(recipe, distill=replace_path(recipe.distill, rest, value, "distill"))
        return recipe

    def settings(self) -> dict[str, Any]:
        """What defines the recipe (logged as params, hashed into content keys): ``train`` and ``distill`` (without
        its ``train`` overrides, already in ``train``, and ``baseline``, a pipeline choice; without ``schedule`` when
        there is none, so the keys of stages recorded before schedules existed stay)."""
        distill = {k: v for k, v in to_dict(self.distill).items()
                   if k not in ("train", "baseline") and not (k == "schedule" and v is None)}
        return {"train": to_dict(self.train), "distill": distill}


#: top-level section name -> its dataclass (see the module docstring)
SECTIONS: Registry[Any] = Registry("config section")
#: the modules that register what a config may name beyond the library's own registries: config sections,
#: pipelines, teacher providers, test metrics. :func:`load_plugins` imports them before a config is read, before a
#: teacher is built (:func:`hpmkd.teachers.provider_for`) and before test metrics are computed; add a module here
#: when it registers such an entry and nothing else imports it.
PLUGIN_MODULES = ("hpmkd.pipelines", "hpmkd.estimator_teacher", "hpmkd.metrics", "hpmkd.f1", "hpmkd.uncertainty_metrics")


@dataclass
class ExperimentConfig:
    """A whole experiment (see ``conf/default.yaml`` for a commented example).

    ``reuse``: a stage whose content key (settings, inputs, data fingerprint, code version) matches a finished stage
    run in the MLflow store is not recomputed; its recorded outputs are reused. ``sections`` holds every registered
    section (:data:`SECTIONS`), each also readable as an attribute (``cfg.chain``, ``cfg.config_manager``).
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
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or section {name!r}")

    def check(self, path: str) -> None:
        if not self.experiment.strip() or not self.experiment.isprintable():
            raise ConfigError(f"experiment: {self.experiment!r} is not a usable name; give a non-empty name without "
                              f"control characters, e.g. experiment: fashion-mnist-kd.")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed: must be in [0, 2**32), got {self.seed}.")
        for key in ("output_dir", "cache_dir"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise ConfigError(f"{key}: empty; give a folder (or remove the key for the default).")
        if not self.teachers:
            raise ConfigError("teachers: at least one teacher is needed.")
        for i, teacher in enumerate(self.teachers):
            if not NAME_PATTERN.match(teacher.name):
                raise ConfigError(f"teachers.{i}.name: {teacher.name!r}; a teacher's name names stages, files and "
                                  f"MLflow keys: use letters, digits, '_', '.' and '-' (at most 64, starting with a "
                                  f"letter or digit), e.g. cnn_teacher.")
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
        names = self.teacher_names()
        if len(set(names)) != len(names):
            raise ConfigError(f"teachers: names must be unique, got {names}.")
        if "reference" in self.distill.methods:
            raise ConfigError("distill.methods.reference: the reference loss anchors a student to the frozen student "
                              "of the previous SMSKD stage; use pipeline smskd and set it under smskd.reference.")

    def teacher_names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def teacher_train(self, index: int) -> TrainConfig:
        return merged_train(self.train, self.teachers[index].train, f"teachers.{index}.train")

    def student_train(self) -> TrainConfig:
        return merged_train(self.train, self.student.train, "student.train")

    def recipe(self, distill: DistillConfig | None = None, path: str = "distill") -> Recipe:
        """``distill`` (default: the ``distill`` section) resolved: its training is the top-level ``train`` with
        its ``train`` keys replaced (``path`` names it in errors)."""
        distill = self.distill if distill is None else distill
        return Recipe(distill, merged_train(self.train, distill.train, f"{path}.train"))

    def with_section(self, name: str, value: Any) -> "ExperimentConfig":
        return replace(self, sections={**self.sections, name: value})

    def with_overrides(self, overrides: dict[str, Any]) -> "ExperimentConfig":
        """The config with config key paths set (typed: each value checked against its field), e.g. the
        configuration a ``tune`` stage hands on."""
        cfg = self
        for path, value in overrides.items():
            name, _, rest = path.partition(".")
            if name in self.sections:
                cfg = cfg.with_section(name, replace_path(cfg.sections[name], rest, value, name))
            else:
                cfg = replace_path(cfg, path, value)
        return cfg

    def as_dict(self) -> dict[str, Any]:
        """Plain data, every section at the top level (as in the YAML)."""
        core = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "sections"}
        return {**core, **{name: to_dict(value) for name, value in self.sections.items()}}

    def cache_root(self) -> Path:
        """Where logit-cache entries live (shared storage on a multi-node cluster)."""
        return Path(self.cache_dir or Path(self.output_dir) / "logit_cache").expanduser().resolve()


def merged_train(base: TrainConfig, overrides: dict[str, Any], path: str) -> TrainConfig:
    """``base`` with the keys of ``overrides`` replaced, validated as a :class:`TrainConfig`."""
    merged = to_dict(base) | overrides
    return from_dict(TrainConfig, merged, path) if overrides else replace(base)


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=0.5"`` -> ``("a.b", 0.5)``; the value is parsed as YAML (``[1, 2]``, ``null``, ``true``, ``1e-3``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. --set distill.temperature.T=2.")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: the key path before '=' is empty, e.g. --set train.lr=0.01.")
    return key.strip(), load_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> ExperimentConfig:
    """Read (:func:`hpmkd.safe_yaml.load_yaml`: safe, no duplicate keys, bounded), override and validate an
    experiment YAML. Raises :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist. The shipped configs are in conf/ (e.g. conf/default.yaml).")
    if path.stat().st_size > MAX_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_BYTES} a config may have; a "
                          f"config is a few kilobytes of YAML.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (byte {err.start} is not UTF-8); give a YAML config.") from None
    return config_from_data(load_yaml(text, str(path)) or {}, overrides)


def load_plugins() -> None:
    """Import :data:`PLUGIN_MODULES` (Python imports each once per process)."""
    for module in PLUGIN_MODULES:
        importlib.import_module(module)


def config_from_data(data: dict[str, Any], overrides: list[str] = ()) -> ExperimentConfig:
    """Validate plain data (a parsed YAML document) with ``--set`` style ``overrides`` into an experiment config."""
    load_plugins()
    data = copy.deepcopy(data)
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of keys, got {type(data).__name__} {data!r}.")
    for text in overrides:
        key, value = parse_override(text)
        set_path(data, key, value)
    core = {f.name for f in dataclasses.fields(ExperimentConfig) if f.name != "sections"}
    for key in data:
        if key not in core and key not in SECTIONS:
            allowed = sorted(core | set(SECTIONS.names()))
            raise ConfigError(f"{key}: unknown key.{did_you_mean(str(key), allowed)} Allowed keys here: "
                              f"{', '.join(allowed)}.")
    sections = {name: from_dict(SECTIONS.get(name), data.pop(name, None) or {}, name) for name in SECTIONS.names()}
    cfg = resolve_meta_split(from_dict(ExperimentConfig, {**data, "sections": sections}))
    check_names(cfg)
    for section in sections.values():
        check_with = getattr(section, "check_with", None)
        if check_with is not None:
            check_with(cfg)
    return cfg


#: the meta split a recipe that learns from held-out data gets when ``data.meta_fraction`` is null (our choice: 5 % of
#: the training split; the meta temperature fits one number, so a small part is enough)
DEFAULT_META_FRACTION = 0.05


def distill_recipes(cfg: ExperimentConfig) -> list[DistillConfig]:
    """Every distillation recipe ``cfg`` may run: the ``distill`` section and those of sections with their own
    (a section's ``recipes(base)``, e.g. SMSKD's stages)."""
    found = [cfg.distill]
    for section in cfg.sections.values():
        recipes = getattr(section, "recipes", None)
        if callable(recipes):
            found += recipes(cfg.distill)
    return found


def learns_from_held_out(recipe: DistillConfig) -> bool:
    """Whether the recipe's temperature schedule has an outer objective on held-out data (``meta``)."""
    from hpmkd.temperature import SCHEDULES

    name = recipe.temperature.get("schedule")
    return name in SCHEDULES and SCHEDULES.get(name).learns_from_held_out


def resolve_meta_split(cfg: ExperimentConfig) -> ExperimentConfig:
    """``data.meta_fraction`` made concrete: null becomes :data:`DEFAULT_META_FRACTION` when a recipe of the
    experiment learns from held-out data and 0 (no meta split, the split plan and fingerprint of every config
    without one unchanged) otherwise. Resolved from the config as written, before component switches, so an
    ablation's variants (``components.meta_temperature=false``) keep the same split plan and share its stages. An
    explicit 0 with such a recipe is an error: the validation split is never a training signal."""
    needed = any(learns_from_held_out(r) for r in distill_recipes(cfg))
    fraction = cfg.data.meta_fraction
    if fraction is None:
        return replace(cfg, data=replace(cfg.data, meta_fraction=DEFAULT_META_FRACTION if needed else 0.0))
    if needed and fraction == 0:
        raise ConfigError("data.meta_fraction: distill.temperature learns T from held-out data (schedule meta), and "
                          "0 holds none out (the validation split only selects). Set it above 0 (e.g. "
                          f"{DEFAULT_META_FRACTION}) or null.")
    return cfg


def check_model(ref: ModelRef, path: str, teacher: bool = False) -> None:
    """The model name is known and, for hpmkd's own models, every option is one it takes. A ``teacher`` may also be
    any model a registered teacher provider serves (:data:`hpmkd.teachers.PROVIDERS`)."""
    from hpmkd.models import MODELS, is_model, list_models
    from hpmkd.teachers import PROVIDERS

    if ref.model in MODELS:
        MODELS.check_options(ref.model, ref.options, f"{path}.options")
        return
    if is_model(ref.model):
        return
    serving = [PROVIDERS.get(p) for p in PROVIDERS.names() if teacher and PROVIDERS.get(p).serves(ref)]
    if serving:
        provider = serving[0]
        check = getattr(provider, "check", None)  # a provider may check its own options (an estimator's keywords)
        if check is not None:
            check(ref, path)
        return
    models = list_models()
    raise ConfigError(f"{path}.model: unknown model {ref.model!r}.{did_you_mean(ref.model, models)} "
                      f"See `hpmkd models` for the list.")


def check_train(cfg: TrainConfig, path: str) -> None:
    from hpmkd.optim import LR_SCHEDULES, OPTIMIZERS

    OPTIMIZERS.get(cfg.optimizer, f"{path}.optimizer")
    OPTIMIZERS.check_options(cfg.optimizer, cfg.optimizer_options, f"{path}.optimizer_options")
    LR_SCHEDULES.get(cfg.lr_schedule, f"{path}.lr_schedule")
    LR_SCHEDULES.check_options(cfg.lr_schedule, cfg.lr_schedule_options, f"{path}.lr_schedule_options")


def check_recipe(recipe: Recipe, path: str) -> None:
    """Every method, the aggregator and the temperature schedule of ``recipe`` exist and take their options; the
    schedule is built, so values it rejects (an initial ``T`` outside its range) are reported here."""
    from hpmkd.ensemble import AGGREGATORS
    from hpmkd.losses import LOSSES
    from hpmkd.temperature import SCHEDULES

    check_train(recipe.train, f"{path}.train")
    distill = recipe.distill
    for name, (_, options) in distill.method_options().items():
        LOSSES.check_options(name, options, f"{path}.methods.{name}")
    agg = distill.aggregator_choice()
    AGGREGATORS.check_options(agg.name, agg.options, f"{path}.aggregator")
    sched = distill.temperature_choice()
    SCHEDULES.build(sched.name, sched.options, f"{path}.temperature")


def check_names(cfg: ExperimentConfig) -> None:
    """Validate every registry name and option of the core sections (models, data set, training, the ``distill``
    recipe); sections check their own in ``check_with``."""
    from hpmkd.data import AUGMENTATIONS, DATASETS
    from hpmkd.data.base import absolute_paths, check_path_options
    from hpmkd.pipelines import PIPELINES

    PIPELINES.get(cfg.pipeline, "pipeline")
    DATASETS.check_options(cfg.data.name, cfg.data.options, "data.options")
    cfg.data.options = absolute_paths(cfg.data.name, cfg.data.options)
    check_path_options(cfg.data.name, cfg.data.options)
    AUGMENTATIONS.get(cfg.data.augment, "data.augment")
    check_train(cfg.train, "train")
    for i, teacher in enumerate(cfg.teachers):
        check_model(teacher.ref, f"teachers.{i}", teacher=True)
        check_train(cfg.teacher_train(i), f"teachers.{i}.train")
    check_model(cfg.student.ref, "student")
    check_train(cfg.student_train(), "student.train")
    check_recipe(cfg.recipe(), "distill")
