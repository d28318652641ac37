"""Everything about an experiment that can be checked without Ray or MLflow, once its data are at hand.

:func:`hpmkd.config.load_config` checks what the config alone says (names, types, ranges, options against the
factories' signatures). :func:`preflight` then checks what needs the data and the files, before Ray starts and
before anything is recorded (``hpmkd run``, ``hpmkd ablate``) or instead of running (``hpmkd validate``):

1. the data set loads, and its labels are class indices in ``[0, num_classes)`` (:func:`hpmkd.data.load_dataset`);
2. every model of the stage graph builds for the data's shape, on the meta device (no memory, no compute): option
   values the architecture rejects (a negative width, a torchvision builder's unknown keyword) fail here;
3. every distillation recipe builds its objective (methods, aggregator, temperature schedule) for its student and
   teachers on the meta device: option values a method or aggregator rejects fail here;
4. every teacher checkpoint loads safely (``weights_only``) and fits its model;
5. every config section that checks itself against the data (``check_data(cfg, splits)``, e.g. MT-BKD's sampling
   length against the steps an epoch has) agrees.

Each failure is a :class:`~hpmkd.registry.ConfigError` naming the config key (or the stage) and the fix.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterator

from hpmkd.components.graph import Stage
from hpmkd.config import ExperimentConfig, Recipe
from hpmkd.data import DataSplits, load_dataset
from hpmkd.models import is_model
from hpmkd.models.ref import DataShape, ModelRef, on_meta
from hpmkd.pipelines import ExperimentPlan
from hpmkd.registry import ConfigError
from hpmkd.teachers import TeacherSpec, load_teacher
from hpmkd.training import StageSpec, teacher_taps_needed

#: what building a model or an objective raises when its options are wrong
BUILD_ERRORS = (TypeError, ValueError, RuntimeError, AssertionError, KeyError, IndexError)


def preflight(plan: ExperimentPlan, splits: DataSplits | None = None, download: bool = True) -> DataSplits:
    """Check ``plan`` against its data (see the module docstring); returns the loaded data (``splits`` when given:
    data already loaded for this config, only the models, objectives and checkpoints are checked). ``download``
    false: never fetch the data set, even with ``data.download`` (``hpmkd validate`` changes nothing)."""
    cfg = plan.cfg
    if splits is None:
        kwargs = cfg.data.loader_kwargs(cfg.seed)
        splits = load_dataset(cfg.data.name, **{**kwargs, "download": kwargs["download"] and download})
    for ref, where in model_refs(cfg, plan.stages):
        check_builds(ref, splits.shape, where)
    for stage in plan.stages:
        check_objective(cfg, stage, plan.stages, splits)
    check_checkpoints(cfg, splits.shape)
    for section in cfg.sections.values():
        check_data = getattr(section, "check_data", None)
        if check_data is not None:
            check_data(cfg, splits)
    return splits


def model_refs(cfg: ExperimentConfig, stages: list[Stage]) -> Iterator[tuple[ModelRef, str]]:
    """Every PyTorch model of the experiment once, with where it is configured: the config's teachers and student by
    key path, models the pipeline derived (a chain's assistants) by stage. Estimator teachers are not among them:
    their provider checks their options when the config loads, and they are built only when fitted."""
    seen: set[str] = set()
    named = [(t.ref, f"teachers.{i}") for i, t in enumerate(cfg.teachers)] + [(cfg.student.ref, "student")]
    derived = [(ref, f"stage {stage.name!r}") for stage in stages for ref in refs_in(stage.params)]
    for ref, where in named + derived:
        key = repr((ref.model, sorted(ref.options.items())))
        if key not in seen and is_model(ref.model):
            seen.add(key)
            yield ref, where


def refs_in(params: Any) -> list[ModelRef]:
    """The model references among a stage's params fields."""
    return [v for f in fields(params) if isinstance(v := getattr(params, f.name), ModelRef)]


def check_builds(ref: ModelRef, shape: DataShape, where: str) -> None:
    try:
        with on_meta():
            ref.build(shape)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err
    except BUILD_ERRORS as err:
        raise ConfigError(f"{where}: model {ref.model!r} with options {ref.options} cannot be built for "
                          f"{shape.num_classes} classes and inputs {tuple(shape.input_shape)}: "
                          f"{type(err).__name__}: {err}. Fix {where}.options.") from err


def produced_models(stages: list[Stage]) -> dict[str, ModelRef]:
    """Stage name -> the model it hands on (its params' model reference: ``model`` or ``student``)."""
    out = {}
    for stage in stages:
        refs = refs_in(stage.params)
        if refs:
            out[stage.name] = refs[0]
    return out


def check_objective(cfg: ExperimentConfig, stage: Stage, stages: list[Stage], splits: DataSplits) -> None:
    """A stage with a distillation recipe builds its objective (every method, the aggregator and the schedule)."""
    params = stage.params
    recipe = getattr(params, "recipe", None)
    if not isinstance(recipe, Recipe):
        return
    models = produced_models(stages)
    teachers = [models[name] for name in getattr(params, "teachers", ()) if name in models]
    spec = StageSpec(stage.name, cfg.seed, cfg.data, refs_in(params)[0], recipe.train, recipe.distill,
                     teacher_models=teachers)
    try:
        with on_meta():
            teacher_taps_needed(spec, splits)
    except ConfigError as err:
        raise ConfigError(f"stage {stage.name!r}: {err}") from err
    except BUILD_ERRORS as err:
        raise ConfigError(f"stage {stage.name!r}: its distillation objective cannot be built: "
                          f"{type(err).__name__}: {err}. Check the distill section's options.") from err


def check_checkpoints(cfg: ExperimentConfig, shape: DataShape) -> None:
    """Given teacher checkpoints load safely and fit their models."""
    for i, teacher in enumerate(cfg.teachers):
        if teacher.checkpoint:
            try:
                load_teacher(TeacherSpec(teacher.name, teacher.ref, shape), teacher.checkpoint)
            except (ConfigError, ValueError) as err:
                raise ConfigError(f"teachers.{i}.checkpoint: {err}") from err
