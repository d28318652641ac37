"""The training loop shared by every stage: plain PyTorch, runnable with or without Ray.

:func:`train_stage` trains one model (a teacher or the student alone with cross-entropy, or a student by
distillation) from a :class:`StageSpec`. Everything that differs between a Ray Train worker and a plain process
(rank, device, DDP wrapping, checkpoint storage, metric sink, where teacher outputs come from) goes through a
:class:`StageEnv`, in the style of Ray's ``train_func(config)`` examples.

The loop itself is fixed and small: batches from the split's data source (:mod:`hpmkd.data.source`), the objective's
loss, backward, the optimiser (:data:`hpmkd.optim.OPTIMIZERS`) and LR schedule (:data:`hpmkd.optim.LR_SCHEDULES`)
step, validation at each epoch's end, a checkpoint. Behaviour beyond that comes from callbacks at the loop's events
(:mod:`hpmkd.callbacks`), and what the stage outputs from its selection (:mod:`hpmkd.selection`): a predictor
(:mod:`hpmkd.predictors`). Model selection uses the validation split; the test split is read once, for the selected
predictor, at the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from hpmkd import posterior  # noqa: F401  (registers the posterior_sampling callback and selection)
from hpmkd.callbacks import Batch, Callback, LoopState, build_callbacks
from hpmkd.config import DataConfig, DistillConfig, TrainConfig
from hpmkd.data import DataSplits, augment, load_dataset
from hpmkd.data.holdout import HoldOut
from hpmkd.data.source import BatchSource, RowSubset
from hpmkd.data.splits import trial_rows
from hpmkd.data.views import ViewBank
from hpmkd.distill_batch import TeacherOutputs
from hpmkd.distiller import CrossEntropyObjective, Distiller, StepOutput
from hpmkd.evaluation import EvaluationConfig, evaluate, measure, predict_final
from hpmkd.models import count_params, load_state_checked, model_taps
from hpmkd.models.ref import ModelRef
from hpmkd.models.state import state_digest
from hpmkd.optim import lr_factor, make_optimizer
from hpmkd.phases import Phases
from hpmkd.selection import SELECTION_KEY, SELECTIONS, Selection
from hpmkd.teachers import TeacherSource, frozen, teacher_taps
from hpmkd.temperature import ScheduleState


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the stage, epoch and step."""


@dataclass
class StageSpec:
    """Everything a worker needs to run one training stage (plain, picklable data).

    ``view_bank``: replay this bank's views (epoch ``e`` trains on view ``e mod N``, see :mod:`hpmkd.data.views`)
    instead of drawing a fresh random augmentation every step; the teacher source is told the view.
    ``init_state``: weights ``model`` starts from (an earlier stage's student) instead of a fresh initialisation.
    ``reference_state``: weights of a frozen copy of ``model`` whose logits every step hands to the objective as
    ``reference_logits`` (the ``reference`` loss of SMSKD).
    ``read_test``: evaluate the selected predictor on the test split at the end (off for search trials, which are
    chosen on validation only), with the registered test metrics and shifts as ``evaluation`` says
    (:func:`hpmkd.evaluation.final_test_metrics`). ``selection``: what the stage selects
    (:data:`hpmkd.selection.SELECTIONS`). ``holdout``: rows of the training split the stage does not train on
    (:mod:`hpmkd.data.holdout`; teachers whose outputs on those rows a Meta-MLP is later fitted on).
    ``callback_options``: typed options of the stage's callbacks and selection, by the name they are registered under
    (a callback that needs options applies when its entry is present).
    ``init_seed``: the seed of the model's initialisation and of the loop's global random draws, when they should
    differ from ``seed``, which also fixes the data split (the chains of a posterior, an ensemble's members).
    ``train_fraction``: train on a stratified share of the training split, fixed by the seed
    (:func:`hpmkd.data.splits.trial_rows`), with the same epochs and schedule: a search trial's reduced fidelity
    (``config_manager.trial_fraction``); 1 trains on all of it.
    """

    name: str
    seed: int
    data: DataConfig
    model: ModelRef
    train: TrainConfig
    distill: DistillConfig | None = None
    teacher_names: list[str] = field(default_factory=list)
    teacher_models: list[ModelRef] = field(default_factory=list)
    view_bank: ViewBank | None = None
    init_state: dict[str, Tensor] | None = None
    reference_state: dict[str, Tensor] | None = None
    read_test: bool = True
    selection: str = "best_epoch"
    holdout: HoldOut | None = None
    callback_options: dict[str, Any] = field(default_factory=dict)
    init_seed: int | None = None
    evaluation: EvaluationConfig | None = None
    train_fraction: float = 1.0


@dataclass
class StageEnv:
    """What the loop needs from its surroundings; the defaults are a single plain process on the CPU."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m
    resume_state: dict[str, Any] | None = None
    report: Callable[[dict[str, float], dict[str, Any] | None], None] = lambda metrics, state: None
    teachers: TeacherSource | None = None
    all_reduce_mean: Callable[[Tensor], Tensor] = lambda t: t
    # the splits of ``spec.data`` and ``spec.seed`` when the caller has them already (a Ray worker gets the driver's
    # through the object store instead of reading and splitting the files again); ``None``: loaded here
    splits: DataSplits | None = None
    # compute the test metrics here; ``False``: return the test predictions instead, as ``final_predictions``, for
    # the caller to measure (:func:`hpmkd.evaluation.measure`): a Ray stage's driver, so no worker imports the metrics
    measure_test: bool = True


def prefetching(
    batches: Iterator[tuple[Tensor, Tensor, Tensor]],
    prepare: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Callable[[], TeacherOutputs | None]]],
) -> Iterator[tuple[Tensor, Tensor, Tensor, Callable[[], TeacherOutputs | None]]]:
    """Yield each batch with its pending teacher outputs, having already requested those of the next batch."""
    pending = None
    for x, y, idx in batches:
        view, waiter = prepare(x, y, idx)
        if pending is not None:
            yield pending
        pending = (view, y, idx, waiter)
    if pending is not None:
        yield pending


def train_stage(spec: StageSpec, env: StageEnv) -> dict[str, Any]:
    """Train ``spec.model`` and return the selected predictor's metrics (see module docstring), with ``phases``: the
    seconds spent in setup, epochs, per-epoch reports and the test read (:mod:`hpmkd.phases`)."""
    phases = Phases()
    setup_began = time.perf_counter()
    torch.manual_seed(spec.seed if spec.init_seed is None else spec.init_seed)
    splits = env.splits
    if splits is None:
        splits = load_dataset(spec.data.name, **spec.data.loader_kwargs(spec.seed))
    if spec.holdout is not None:
        splits = replace(splits, train=spec.holdout.kept(splits.train))
    model = spec.model.build(splits.shape)
    if spec.init_state is not None:
        load_state_checked(model, spec.init_state)
    reference = frozen_reference(spec, splits, env.device)
    objective = make_objective(spec, model, splits)
    objective.to(env.device)
    cfg = spec.train
    train_rows = training_rows(splits, spec)
    steps_per_epoch = math.ceil(len(train_rows) / (cfg.batch_size * env.world_size))
    generator = torch.Generator().manual_seed(spec.seed * 1000 + env.rank)

    # Lazily-shaped parts (adapters, CRD banks) are built from the first batch before the optimiser exists.
    first_idx = torch.arange(min(cfg.batch_size, len(splits.train)))
    first_x, first_y = splits.train.rows(first_idx)
    if spec.view_bank is not None:  # the inputs whose teacher outputs the source holds (view 0)
        first_x = spec.view_bank.render(first_x, first_idx, 0)
    first_x = first_x.to(env.device)
    first_teachers = request_teachers(env, objective, first_x, first_idx)()
    objective.setup(first_x, first_y.to(env.device), first_idx, first_teachers, total_epochs=cfg.epochs)

    optimizer = make_optimizer(list(model.parameters()) + objective.extra_parameters(), cfg, len(splits.train))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, cfg.epochs * steps_per_epoch, steps_per_epoch))
    wrapped = env.wrap(objective)
    state = LoopState(spec, env, splits, model, objective, optimizer, scheduler, steps_per_epoch)
    selection: Selection = SELECTIONS.get(spec.selection, "selection")()
    callbacks: list[Callback] = [*build_callbacks(state), selection]

    start_epoch, saved = 0, env.resume_state
    if saved is not None:
        objective.load_state_dict(saved["objective"])
        for callback in callbacks:
            if callback.state_key is not None:
                callback.load_state_dict(saved[callback.state_key])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        start_epoch, state.step, state.history = saved["epoch"] + 1, saved["step"], saved["history"]
    resumed_at_epoch = start_epoch  # 0 when trained from scratch; > 0 after a restart resumed a checkpoint
    for callback in callbacks:
        callback.on_start(state)
    if saved is not None:  # after on_start: a callback may have put another optimiser in place (a sampling phase)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
    phases.add("setup", time.perf_counter() - setup_began)

    for epoch in range(start_epoch, cfg.epochs):
        state.epoch = epoch
        began = time.perf_counter()
        for callback in callbacks:
            callback.on_epoch_start(state)
        objective.train()
        sums: dict[str, float] = {}
        seen = 0

        def prepare(x: Tensor, y: Tensor, idx: Tensor):
            if spec.view_bank is None:
                view = augment(spec.data.augment, x, generator).to(env.device)
                return view, request_teachers(env, objective, view, idx)
            number = spec.view_bank.view_of(epoch)
            view = spec.view_bank.render(x, idx, number).to(env.device)
            return view, request_teachers(env, objective, view, idx, number)

        batches = train_rows.batches(cfg.batch_size, shuffle=True, seed=spec.seed, epoch=epoch, rank=env.rank,
                                     world_size=env.world_size)
        for x, y, idx, waiter in prefetching(batches, prepare):
            kwargs: dict[str, Any] = dict(epoch=epoch, total_epochs=cfg.epochs)
            if reference is not None:
                with torch.no_grad():
                    kwargs["reference_logits"] = reference(x)
            state.batch = Batch(x, y.to(env.device), idx, waiter(), kwargs)
            out: StepOutput = wrapped(x, state.batch.y, idx, state.batch.teachers, **kwargs)
            state.out = out
            if not torch.isfinite(out.loss):
                raise NonFiniteLossError(
                    f"stage {spec.name!r}: the loss became {out.loss.item()} at epoch {epoch} (step {state.step}). "
                    f"Earlier stages are kept. Lower train.lr or the loss weights and rerun."
                )
            state.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            for callback in callbacks:
                callback.after_backward(state)
            state.optimizer.step()
            state.scheduler.step()
            state.step += 1
            for callback in callbacks:
                callback.after_step(state)
            objective.observe(ScheduleState(step=state.step, total_steps=state.total_steps, epoch=epoch,
                                            total_epochs=cfg.epochs, train_loss=out.loss.item()))
            n = len(y)
            seen += n
            sums["train_loss"] = sums.get("train_loss", 0.0) + out.loss.item() * n
            for key, value in out.terms.items():
                sums[f"loss.{key}"] = sums.get(f"loss.{key}", 0.0) + value.item() * n

        metrics = {k: v / max(1, seen) for k, v in sums.items()}
        val_acc, val_loss = evaluate(model, splits.val, cfg.eval_batch_size, env.device)
        metrics.update(epoch=float(epoch), val_acc=val_acc, val_loss=val_loss, lr=state.lr,
                       epoch_time_s=time.perf_counter() - began)
        for callback in callbacks:
            callback.on_evaluate(state, metrics)
        state.history.append(metrics)
        for callback in callbacks:
            callback.end_of_epoch(state, metrics)
        phases.add("epochs", time.perf_counter() - began)
        with phases.timed("report"):
            env.report(metrics, checkpoint_state(state, callbacks, generator, selection) if env.rank == 0 else None)

    predictor = selection.predictor(state)
    # a final stage reads the test split once, for the selected predictor; a search trial never reads it
    tested = {}
    if spec.read_test:
        with phases.timed("test"):
            predicted = predict_final(predictor, splits, cfg.eval_batch_size, env.device, spec.evaluation)
            tested = {"test_acc": predicted.test.accuracy, "test_loss": predicted.test.loss,
                      **(measure(predicted, spec.evaluation) if env.measure_test else {"final_predictions": predicted})}
    return {
        **tested,
        **selection.summary(),
        "params": count_params(model),
        "data_fingerprint": splits.fingerprint,
        "epochs_run": len(state.history),
        "resumed_at_epoch": resumed_at_epoch,
        "history": state.history,
        "phases": phases.seconds,
        **({"reference_sha256": state_digest(reference.state_dict())} if reference is not None else {}),
    }


def training_rows(splits: DataSplits, spec: StageSpec) -> BatchSource:
    """The rows the stage trains on: the training split, or its ``spec.train_fraction`` (a search trial's)."""
    if spec.train_fraction >= 1:
        return splits.train
    rows = trial_rows(splits.train.y.numpy(), spec.train_fraction, spec.seed)
    return RowSubset(splits.train, torch.from_numpy(rows))


def checkpoint_state(state: LoopState, callbacks: list[Callback], generator: torch.Generator,
                     selection: Selection) -> dict[str, Any]:
    """Everything a resumed stage needs (``state.pt``): the model, objective, optimiser, LR schedule, epoch, step,
    random number generators, history, and each callback's state under its key."""
    return {
        "model": state.model.state_dict(),
        "objective": state.objective.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "epoch": state.epoch,
        "step": state.step,
        "history": state.history,
        SELECTION_KEY: selection.name,
        **{c.state_key: c.state_dict() for c in callbacks if c.state_key is not None},
    }


def frozen_reference(spec: StageSpec, splits: DataSplits, device: torch.device) -> nn.Module | None:
    """The frozen reference (``spec.reference_state``; eval mode, no gradients, never handed to the optimiser nor
    wrapped with the objective), or ``None``. :func:`train_stage` returns the digest of its state after training
    (``reference_sha256``): equal to the digest of ``spec.reference_state`` when it stayed frozen."""
    if spec.reference_state is None:
        return None
    reference = spec.model.build(splits.shape)
    load_state_checked(reference, spec.reference_state)
    return frozen(reference).to(device)


def make_objective(spec: StageSpec, model: nn.Module, splits: DataSplits) -> nn.Module:
    if spec.distill is None:
        return CrossEntropyObjective(model)
    return Distiller(
        model,
        spec.distill,
        num_classes=splits.num_classes,
        num_train=len(splits.train),
        input_shape=splits.input_shape,
        student_taps=model_taps(model),
        teacher_taps=[teacher_taps(m, splits.shape) for m in spec.teacher_models],
    )


def teacher_taps_needed(spec: StageSpec, splits: DataSplits) -> list[list[str]]:
    """Per teacher, the feature taps the stage's methods read (built on the meta device: no memory, no compute)."""
    with torch.device("meta"):
        return make_objective(spec, spec.model.build(splits.shape), splits).teacher_tap_names()


def request_teachers(env: StageEnv, objective: nn.Module, x: Tensor, index: Tensor,
                     view: int = 0) -> Callable[[], TeacherOutputs | None]:
    if env.teachers is None or not objective.needs_teachers:
        return lambda: None
    pending = env.teachers.request(x, index, objective.teacher_tap_names(), view)
    return lambda: pending().to(env.device)
