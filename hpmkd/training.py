"""The training loop shared by every stage: plain PyTorch, runnable with or without Ray.

:func:`train_stage` trains one model (a teacher or the student alone with cross-entropy, or a student by
distillation) from a :class:`StageSpec`. Everything that differs between a Ray Train worker and a plain process
(rank, device, DDP wrapping, checkpoint storage, metric sink, where teacher outputs come from) goes through a
:class:`StageEnv`, in the style of Ray's ``train_func(config)`` examples. Model selection uses the validation split;
the test split is read once, for the selected weights, at the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpmkd.config import DataConfig, DistillConfig, ModelConfig, TrainConfig
from hpmkd.data import DataSplits, Split, augment, iterate_batches, load_dataset
from hpmkd.data.views import ViewBank
from hpmkd.distill_batch import TeacherOutputs
from hpmkd.distiller import CrossEntropyObjective, Distiller, StepOutput
from hpmkd.models import count_params, create_model, load_state_checked, model_taps
from hpmkd.models.state import state_digest
from hpmkd.teachers import TeacherSource, frozen
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
    ``read_test``: evaluate the selected weights on the test split at the end (off for search trials, which are
    chosen on validation only).
    """

    name: str
    seed: int
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    distill: DistillConfig | None = None
    teacher_names: list[str] = field(default_factory=list)
    teacher_models: list[ModelConfig] = field(default_factory=list)
    view_bank: ViewBank | None = None
    init_state: dict[str, Tensor] | None = None
    reference_state: dict[str, Tensor] | None = None
    read_test: bool = True


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


def build_model(spec: ModelConfig, splits: DataSplits) -> nn.Module:
    shape = splits.input_shape
    return create_model(spec.model, num_classes=splits.num_classes, in_channels=shape[0], input_shape=shape, **spec.options)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    optim_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return optim_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimisation step ``s`` (linear warm-up, then the schedule)."""
    warm = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.lr_schedule == "step":
            return cfg.lr_gamma ** sum(progress >= m for m in cfg.lr_milestones)
        return 1.0

    return factor


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``split``."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(split.y), batch_size):
        x = split.x[start : start + batch_size].to(device)
        y = split.y[start : start + batch_size].to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    n = max(1, len(split.y))
    return correct / n, loss_sum / n


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
    """Train ``spec.model`` and return the selected model's metrics (see module docstring)."""
    torch.manual_seed(spec.seed)
    splits = load_dataset(spec.data.name, **spec.data.loader_kwargs(spec.seed))
    model = build_model(spec.model, splits)
    if spec.init_state is not None:
        load_state_checked(model, spec.init_state)
    reference = frozen_reference(spec, splits, env.device)
    objective = make_objective(spec, model, splits)
    objective.to(env.device)
    cfg = spec.train
    params = list(model.parameters()) + objective.extra_parameters()
    steps_per_epoch = math.ceil(len(splits.train.y) / (cfg.batch_size * env.world_size))
    generator = torch.Generator().manual_seed(spec.seed * 1000 + env.rank)

    # Lazily-shaped parts (adapters, CRD banks) are built from the first batch before the optimiser exists.
    first_idx = torch.arange(min(cfg.batch_size, len(splits.train.y)))
    first_x = splits.train.x[first_idx]
    if spec.view_bank is not None:  # the inputs whose teacher outputs the source holds (view 0)
        first_x = spec.view_bank.render(first_x, first_idx, 0)
    first_x = first_x.to(env.device)
    first_teachers = request_teachers(env, objective, first_x, first_idx)()
    if isinstance(objective, Distiller):
        objective.setup(first_x, splits.train.y[first_idx].to(env.device), first_idx, first_teachers, total_epochs=cfg.epochs)
        params = list(model.parameters()) + objective.extra_parameters()

    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, cfg.epochs * steps_per_epoch, steps_per_epoch))
    wrapped = env.wrap(objective)

    start_epoch, step = 0, 0
    best: dict[str, Any] = {"val_acc": -1.0, "epoch": -1, "model": None}
    history: list[dict[str, float]] = []
    if env.resume_state is not None:
        state = env.resume_state
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, step, best, history = state["epoch"] + 1, state["step"], state["best"], state["history"]
    resumed_at_epoch = start_epoch  # 0 when trained from scratch; > 0 after a restart resumed a checkpoint

    val_iter = val_batches(splits, cfg.batch_size, spec.seed)
    for epoch in range(start_epoch, cfg.epochs):
        began = time.perf_counter()
        objective.train()
        sums: dict[str, float] = {}
        weight_sum: Tensor | None = None
        seen = 0

        def prepare(x: Tensor, y: Tensor, idx: Tensor):
            if spec.view_bank is None:
                view = augment(spec.data.augment, x, generator).to(env.device)
                return view, request_teachers(env, objective, view, idx)
            number = spec.view_bank.view_of(epoch)
            view = spec.view_bank.render(x, idx, number).to(env.device)
            return view, request_teachers(env, objective, view, idx, number)

        batches = iterate_batches(splits.train, cfg.batch_size, shuffle=True, seed=spec.seed, epoch=epoch,
                                  rank=env.rank, world_size=env.world_size)
        for x, y, idx, waiter in prefetching(batches, prepare):
            y = y.to(env.device)
            teachers = waiter()
            kwargs = dict(epoch=epoch, total_epochs=cfg.epochs)
            if reference is not None:
                with torch.no_grad():
                    kwargs["reference_logits"] = reference(x)
            out: StepOutput = wrapped(x, y, idx, teachers, **kwargs)
            if not torch.isfinite(out.loss):
                raise NonFiniteLossError(
                    f"stage {spec.name!r}: the loss became {out.loss.item()} at epoch {epoch} (step {step}). "
                    f"Earlier stages are kept. Lower train.lr or the loss weights and rerun."
                )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if isinstance(objective, Distiller) and objective.schedule.learns_from_validation and step % spec.distill.meta_interval == 0:
                x_val, y_val = next(val_iter)
                objective.meta_step((x, y, idx, teachers), (x_val.to(env.device), y_val.to(env.device)),
                                    scheduler.get_last_lr()[0], **kwargs)
                with torch.no_grad():  # every worker keeps the same temperature
                    for p in objective.schedule.parameters():
                        p.copy_(env.all_reduce_mean(p.detach().clone()))
            objective.observe(ScheduleState(step=step, total_steps=cfg.epochs * steps_per_epoch, epoch=epoch,
                                            total_epochs=cfg.epochs, train_loss=out.loss.item()))
            n = len(y)
            seen += n
            sums["train_loss"] = sums.get("train_loss", 0.0) + out.loss.item() * n
            for key, value in out.terms.items():
                sums[f"loss.{key}"] = sums.get(f"loss.{key}", 0.0) + value.item() * n
            if out.teacher_weights is not None:
                w = out.teacher_weights.sum(0)
                weight_sum = w if weight_sum is None else weight_sum + w

        metrics = {k: v / max(1, seen) for k, v in sums.items()}
        val_acc, val_loss = evaluate(model, splits.val, cfg.eval_batch_size, env.device)
        metrics.update(epoch=float(epoch), val_acc=val_acc, val_loss=val_loss, lr=scheduler.get_last_lr()[0],
                       epoch_time_s=time.perf_counter() - began)
        temperature = objective.temperature_value()
        if temperature is not None:
            metrics["temperature"] = temperature
        if weight_sum is not None:
            for name, w in zip(spec.teacher_names, (weight_sum / max(1, seen)).tolist()):
                metrics[f"teacher_weight.{name}"] = w
        if val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "epoch": epoch, "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        history.append(metrics)
        state = None
        if env.rank == 0:
            state = {
                "model": model.state_dict(),
                "objective": objective.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "step": step,
                "best": best,
                "history": history,
            }
        env.report(metrics, state)

    model.load_state_dict(best["model"])
    # a final stage reads the test split once, for the selected weights; a search trial never reads it
    tested = evaluate(model, splits.test, cfg.eval_batch_size, env.device) if spec.read_test else None
    return {
        **({"test_acc": tested[0], "test_loss": tested[1]} if tested else {}),
        "val_acc": best["val_acc"],
        "selected_epoch": best["epoch"],
        "params": count_params(model),
        "data_fingerprint": splits.fingerprint,
        "epochs_run": len(history),
        "resumed_at_epoch": resumed_at_epoch,
        "history": history,
        **({"reference_sha256": state_digest(reference.state_dict())} if reference is not None else {}),
    }


def frozen_reference(spec: StageSpec, splits: DataSplits, device: torch.device) -> nn.Module | None:
    """The frozen reference (``spec.reference_state``; eval mode, no gradients, never handed to the optimiser nor
    wrapped with the objective), or ``None``. :func:`train_stage` returns the digest of its state after training
    (``reference_sha256``): equal to the digest of ``spec.reference_state`` when it stayed frozen."""
    if spec.reference_state is None:
        return None
    reference = build_model(spec.model, splits)
    load_state_checked(reference, spec.reference_state)
    return frozen(reference).to(device)


def make_objective(spec: StageSpec, model: nn.Module, splits: DataSplits) -> nn.Module:
    if spec.distill is None:
        return CrossEntropyObjective(model)
    with torch.device("meta"):  # only the module names are needed, not weights
        teacher_taps = [model_taps(build_model(m, splits)) for m in spec.teacher_models]
    return Distiller(
        model,
        spec.distill,
        num_classes=splits.num_classes,
        num_train=len(splits.train.y),
        input_shape=splits.input_shape,
        student_taps=model_taps(model),
        teacher_taps=teacher_taps,
    )


def teacher_taps_needed(spec: StageSpec, splits: DataSplits) -> list[list[str]]:
    """Per teacher, the feature taps the stage's methods read (built on the meta device: no memory, no compute)."""
    with torch.device("meta"):
        return make_objective(spec, build_model(spec.model, splits), splits).teacher_tap_names()


def request_teachers(env: StageEnv, objective: nn.Module, x: Tensor, index: Tensor,
                     view: int = 0) -> Callable[[], TeacherOutputs | None]:
    if env.teachers is None or not isinstance(objective, Distiller):
        return lambda: None
    pending = env.teachers.request(x, index, objective.teacher_tap_names(), view)
    return lambda: pending().to(env.device)


def val_batches(splits: DataSplits, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled validation batches (for the meta-learned temperature's outer objective)."""
    epoch = 0
    while True:
        for x, y, _ in iterate_batches(splits.val, batch_size, shuffle=True, seed=seed + 7, epoch=epoch):
            yield x, y
        epoch += 1
