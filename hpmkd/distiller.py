"""Training objectives: plain cross-entropy, and the distiller that composes KD methods from a YAML recipe.

The distiller computes, for one batch,

    L = ce_weight · CE(z_S, y) + Σ_k weight_k · Σ_j ℓ_{k,j} + Σ_a r_a

where ``k`` runs over the recipe's KD methods (each returns named terms ``ℓ_{k,j}``, see :mod:`hpmkd.losses`; a
method whose weight is 0, e.g. switched off by the stage schedule :mod:`hpmkd.loss_schedule`, is not computed), and
``r_a`` are the aggregator's own terms (for instance the attention ensemble's entropy regulariser, already weighted by
its coefficient, see :mod:`hpmkd.ensemble`). The temperature comes from the recipe's schedule
(:mod:`hpmkd.temperature`); a meta-learned schedule is updated by :meth:`Distiller.meta_step` from a batch of the
meta split.
This mirrors mdistiller's ``Distiller.forward_train`` returning ``(logits, {"loss_ce": ..., "loss_kd": ...})``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hpmkd.config import DistillConfig
from hpmkd.distill_batch import DistillBatch, ModelTaps, TeacherOutputs
from hpmkd.ensemble import AGGREGATORS
from hpmkd.features import FeatureTaps
from hpmkd.losses import LOSSES
from hpmkd.temperature import SCHEDULES, ScheduleState


@dataclass
class StepOutput:
    """What one objective evaluation gives back: the logits, the loss to minimise and detached named terms."""

    logits: Tensor
    loss: Tensor
    terms: dict[str, Tensor]
    teacher_weights: Tensor | None = None
    confidence: Tensor | None = None


class CrossEntropyObjective(nn.Module):
    """``L = CE(z_S, y)``: how teachers and the student trained alone learn."""

    needs_teachers = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.student = model

    def setup(self, x: Tensor, y: Tensor, index: Tensor, teachers: TeacherOutputs | None, **kwargs: Any) -> None:
        """Cross-entropy has no shape-dependent parts."""

    def forward(self, x: Tensor, y: Tensor, index: Tensor, teachers: TeacherOutputs | None = None, **_: Any) -> StepOutput:
        logits = self.student(x)
        loss = F.cross_entropy(logits, y)
        return StepOutput(logits, loss, {"ce": loss.detach()})

    def temperature_value(self) -> float | None:
        return None

    def observe(self, state: ScheduleState) -> None:
        """Cross-entropy has no schedule to advance."""

    def extra_parameters(self) -> list[nn.Parameter]:
        return []

    def teacher_tap_names(self) -> list[list[str]]:
        return []


class Distiller(nn.Module):
    """Student + KD methods + multi-teacher aggregator + temperature schedule, built from a :class:`DistillConfig`."""

    needs_teachers = True

    def __init__(
        self,
        student: nn.Module,
        recipe: DistillConfig,
        *,
        num_classes: int,
        num_train: int,
        input_shape: tuple[int, ...],
        student_taps: ModelTaps,
        teacher_taps: list[ModelTaps],
    ):
        super().__init__()
        self.student = student
        self.ce_weight = recipe.ce_weight
        self.num_teachers = len(teacher_taps)
        context = dict(
            num_classes=num_classes,
            num_teachers=len(teacher_taps),
            num_train=num_train,
            student_taps=student_taps,
            teacher_taps=teacher_taps,
        )
        self.method_weights: dict[str, float] = {}
        methods = {}
        for name, (weight, options) in recipe.method_options().items():
            methods[name] = LOSSES.build(name, options, f"distill.methods.{name}", **context)
            self.method_weights[name] = weight
        self.methods = nn.ModuleDict(methods)
        agg = recipe.aggregator_choice()
        self.aggregator = AGGREGATORS.build(agg.name, agg.options, "distill.aggregator", input_shape=input_shape, **context)
        sched = recipe.temperature_choice()
        self.schedule = SCHEDULES.build(sched.name, sched.options, "distill.temperature")
        tap_names = sorted(set().union(*(m.student_tap_names() for m in self.methods.values())) if methods else set())
        self.taps = FeatureTaps(student, tap_names)
        self._ready = False

    # -- what the training loop needs to know -------------------------------------------------------------------
    def teacher_tap_names(self) -> list[list[str]]:
        """Per teacher, the feature taps any method needs (sent to the teacher service)."""
        per_teacher: list[set[str]] = [set() for _ in range(self.num_teachers)]
        for method in self.methods.values():
            for i, names in enumerate(method.teacher_tap_names()):
                per_teacher[i] |= set(names)
        return [sorted(s) for s in per_teacher]

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters besides the student's: adapters, embeddings, the attention network."""
        own = {id(p) for p in self.student.parameters()} | {id(p) for p in self.schedule.parameters()}
        return [p for p in self.parameters() if id(p) not in own and p.requires_grad]

    def temperature_value(self) -> float:
        return float(self.schedule.value())

    def observe(self, state: ScheduleState) -> None:
        self.schedule.observe(state)

    # -- the objective -------------------------------------------------------------------------------------------
    def setup(self, x: Tensor, y: Tensor, index: Tensor, teachers: TeacherOutputs, **kwargs: Any) -> None:
        """Let methods build shape-dependent parts (adapters, memory banks) from a real first batch."""
        with torch.no_grad():
            batch, _ = self.make_batch(x, y, index, teachers, self.schedule.current().detach(), **kwargs)
        for method in self.methods.values():
            method.setup(batch)
        self._ready = True

    def make_batch(
        self,
        x: Tensor,
        y: Tensor,
        index: Tensor,
        teachers: TeacherOutputs,
        temperature: Tensor,
        *,
        epoch: int = 0,
        total_epochs: int = 1,
        reference_logits: Tensor | None = None,
        params: dict[str, Tensor] | None = None,
    ) -> tuple[DistillBatch, dict[str, Tensor]]:
        """The student's forward pass and the aggregator's weights, packed for the methods; plus the aggregator's terms."""
        with self.taps.capture() as feats:
            logits = self.student(x) if params is None else functional_call(self.student, params, (x,))
        agg = self.aggregator(teachers.logits, y, x, logits, temperature)
        batch = DistillBatch(
            x=x,
            y=y,
            index=index,
            student_logits=logits,
            student_features=dict(feats),
            teachers=teachers,
            teacher_weights=agg.weights,
            mix=self.aggregator.mix,
            temperature=temperature,
            epoch=epoch,
            total_epochs=total_epochs,
            reference_logits=reference_logits,
            confidence=agg.confidence,
        )
        return batch, {f"aggregator.{k}": v for k, v in agg.terms.items()}

    def objective(self, batch: DistillBatch, aggregator_terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``L`` of the module docstring and its raw named terms."""
        ce = F.cross_entropy(batch.student_logits, batch.y)
        loss = self.ce_weight * ce
        terms = {"ce": ce}
        for name, method in self.methods.items():
            if self.method_weights[name] == 0:
                continue
            for term, value in method(batch).items():
                terms[f"{name}.{term}"] = value
                loss = loss + self.method_weights[name] * value
        for name, value in aggregator_terms.items():
            terms[name] = value
            loss = loss + value
        return loss, terms

    def forward(
        self, x: Tensor, y: Tensor, index: Tensor, teachers: TeacherOutputs, **kwargs: Any
    ) -> StepOutput:
        if not self._ready:
            raise RuntimeError("Distiller.setup(first batch) must run before training (it builds the adapters).")
        batch, agg_terms = self.make_batch(x, y, index, teachers, self.schedule.current().detach(), **kwargs)
        loss, terms = self.objective(batch, agg_terms)
        confidence = None if batch.confidence is None else batch.confidence.detach()
        return StepOutput(batch.student_logits, loss, {k: v.detach() for k, v in terms.items()},
                          batch.teacher_weights.detach(), confidence)

    def meta_step(
        self,
        train: tuple[Tensor, Tensor, Tensor, TeacherOutputs],
        held_out: tuple[Tensor, Tensor],
        inner_lr: float,
        **kwargs: Any,
    ) -> float | None:
        """One hypergradient step of a temperature learned from held-out data (no-op for other schedules).

        Inner step: ``θ' = θ − η ∇_θ L_train(θ, T)``; outer objective: ``CE(f_θ'(x_meta), y_meta)`` on a batch of the
        meta split (never the validation split), differentiated
        with respect to ``T`` (see :class:`hpmkd.temperature.MetaTemperature`). BatchNorm buffers are restored so the
        look-ahead leaves the model exactly as it was.
        """
        if not self.schedule.learns_from_held_out:
            return None
        x, y, index, teachers = train
        x_held, y_held = held_out
        buffers = {k: b.clone() for k, b in self.student.named_buffers()}
        params = dict(self.student.named_parameters())

        def train_loss(p: dict[str, Tensor], temperature: Tensor) -> Tensor:
            return self.objective(*self.make_batch(x, y, index, teachers, temperature, params=p, **kwargs))[0]

        def held_out_loss(p: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(functional_call(self.student, p, (x_held,)), y_held)

        grad = self.schedule.hyper_step(train_loss, held_out_loss, params, inner_lr)
        with torch.no_grad():
            for name, buf in self.student.named_buffers():
                buf.copy_(buffers[name])
        return grad

