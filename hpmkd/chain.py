"""The progressive distillation chain: which intermediate models stand between a teacher and a student, and when the
chain stops adding them (plain PyTorch; no Ray, no MLflow).

HPM-KD's chain (Haase & Dourado da Silva, arXiv 2512.09886, authors' draft ``guhaase/papers-deepbridge``
``01_HPM-KD_Framework/POR/sections/04-methodology.tex``; TAKD, Mirzadeh et al., AAAI 2020, arXiv 1902.03393, is the
same chain given by hand)::

    f_T = f_0 → f_1 → … → f_L = f_S,     |θ_i| = |θ_T| · r^{i/L},   r = |θ_S| / |θ_T|

:func:`plan_chain` picks the assistants ``f_1 … f_{L−1}``:

* **L** is the smallest number of steps whose every size ratio ``|θ_{i−1}| / |θ_i|`` is at most ``max_gap``. The
  ideal sizes above give every step the ratio ``r^{−1/L}``, so the search starts at ``L = ⌈ln(1/r) / ln max_gap⌉``
  and adds a step only when the sizes that can actually be built (whole channels, valid depths) miss the bound.
  Each assistant is one of the two buildable sizes either side of its target: the combination nearest the targets
  (least summed ``|ln(size / target)|``) among those whose every step stays within ``max_gap``.
* **Models** come from the student's family (for a heterogeneous pair too: the student's architecture is the one
  being compressed to). ``scale`` says which knob moves: ``width`` (the student's depth, the width solved for the
  target size), ``depth`` (the student's width, the valid depth nearest the target), or ``both`` (our default:
  when teacher and student are of one family the depth is interpolated geometrically, ``d_i = d_T^{1−i/L} ·
  d_S^{i/L}`` snapped to a valid depth, and the width then solved for the target size; otherwise as ``width``).
  Sizes are counted on the ``meta`` device (no memory, no compute).

:func:`stops_after` is HPM-KD's ε rule: the chain stops adding links after link ``i`` when its relative validation
gain ``(Acc_i − Acc_{i−1}) / Acc_{i−1}`` falls below ε (not applied at ``i = 1``). How the pipelines apply it at run
time is described in ``docs/methods.md`` (progressive chain).

:func:`decide_links` applies the same ε to the first link, before the chain trains anything, from measured
accuracies (our construction; the draft applies the rule only from the second link on): whether an assistant pays
for itself. The chain must bridge the measured relative gap ``G = (Acc_T − Acc_S) / Acc_S`` between the teacher it
compresses and the student trained alone (both on validation). Its ``L`` steps follow sizes in geometric
progression, so they share the gap geometrically, each carrying ``(1 + G)^{1/L} − 1``; a link that carries less than
ε sits within ε of its neighbour and teaches the next model nothing its neighbour could not (TAKD's capacity gap,
Mirzadeh et al., AAAI 2020: an assistant helps where the gap is too large for the student to follow). So the chain
keeps ``L' = min(L, ⌊ln(1 + G) / ln(1 + ε)⌋)`` steps (at least 1): with ``G < (1 + ε)² − 1`` no assistant is trained
and the student distils from the teachers directly.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal


from hpmkd.models import MODELS
from hpmkd.models.ref import DataShape, ModelRef
from hpmkd.registry import ConfigError
from hpmkd.teachers import teacher_size

Scale = Literal["width", "depth", "both"]

#: a float width knob (a multiplier) is searched in steps of 1/WIDTH_STEPS
WIDTH_STEPS = 100
#: no knob index (width units, valid depths) is searched beyond this
MAX_UNITS = 1 << 20
#: the depth option every scalable family has (hpmkd/models/base.py: "each family exposes its depth and width")
DEPTH = "depth"


@dataclass(frozen=True)
class Scaling:
    """How one model family (the module that defines it) grows: its width option (whole channels / units, or a
    float multiplier) and its valid depths ``depth_start + k · depth_step``."""

    family: str
    width: str
    integer_width: bool
    depth_start: int
    depth_step: int

    @property
    def name(self) -> str:
        return self.family.rsplit(".", 1)[-1]

    def width_value(self, units: int) -> int | float:
        return units if self.integer_width else round(units / WIDTH_STEPS, 2)

    def width_units(self, value: float) -> int:
        return max(1, round(value if self.integer_width else value * WIDTH_STEPS))

    def snap_depth(self, depth: float) -> int:
        """The valid depth nearest ``depth`` (never below the family's smallest)."""
        k = max(0, round((depth - self.depth_start) / self.depth_step))
        return self.depth_start + k * self.depth_step


#: the module that defines a model -> how its family scales (hpmkd/models: every family has ``depth`` and a width)
SCALINGS: dict[str, Scaling] = {
    s.family: s
    for s in (
        Scaling("hpmkd.models.cnn", "width", True, 1, 1),
        Scaling("hpmkd.models.mlp", "hidden", True, 1, 1),
        Scaling("hpmkd.models.tabular", "width", True, 1, 1),
        Scaling("hpmkd.models.cifar_resnet", "width_mult", False, 8, 6),
        Scaling("hpmkd.models.wrn", "widen_factor", False, 10, 6),
        Scaling("hpmkd.models.vgg", "width_mult", False, 1, 1),
    )
}


def family_of(model: str) -> str | None:
    """The module that defines model ``model`` (its family), or ``None`` for models outside :data:`MODELS`."""
    if model not in MODELS:
        return None
    factory = MODELS.get(model)
    return getattr(factory, "func", factory).__module__  # cnn presets are functools.partial objects


def scaling_of(model: str) -> Scaling:
    family = family_of(model)
    if family not in SCALINGS:
        families = ", ".join(s.name for s in SCALINGS.values())
        raise ConfigError(
            f"student.model: the chain planner scales the student's family, but {model!r} has no width/depth knobs it "
            f"knows (families: {families}). Give the assistants by hand in chain.assistants instead."
        )
    return SCALINGS[family]


def knobs(model: ModelRef) -> dict[str, Any]:
    """A model's options with its factory's defaults filled in (``cnn_small`` -> ``width=32, depth=3, ...``)."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(MODELS.get(model.model)).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **model.options}


@dataclass
class ChainModel:
    """One model of a chain: its config, its parameter count (``None`` for a teacher whose size is known only once
    fitted, an estimator), and the size it was chosen for (assistants only)."""

    role: Literal["teacher", "assistant", "student"]
    model: ModelRef
    params: int | None
    target: float | None = None


@dataclass
class ChainPlan:
    """The chain ``teacher → assistants → student``; :attr:`why` says how it was chosen (printed and logged)."""

    teacher: ChainModel
    assistants: list[ChainModel]
    student: ChainModel
    why: str
    max_gap: float | None = None
    scale: str | None = None
    family: str | None = None

    @property
    def models(self) -> list[ChainModel]:
        return [self.teacher, *self.assistants, self.student]

    @property
    def steps(self) -> int:
        """L: the number of distillation steps (assistants + 1)."""
        return len(self.assistants) + 1

    @property
    def ratios(self) -> list[float | None]:
        """Each step's size ratio ``|θ_{i−1}| / |θ_i|`` (``None`` from a teacher of unknown size)."""
        sizes = [m.params for m in self.models]
        return [None if a is None else a / b for a, b in zip(sizes, sizes[1:])]

    def table(self) -> str:
        lines = [f"{'i':>2}  {'role':<10}{'model':<12}{'options':<40}{'params':>11}{'target':>11}{'ratio':>8}"]
        for i, (m, ratio) in enumerate(zip(self.models, [None, *self.ratios])):
            options = ", ".join(f"{k}={v}" for k, v in m.model.options.items()) or "-"
            lines.append(f"{i:>2}  {m.role:<10}{m.model.model:<12}{options:<40}"
                         f"{'-' if m.params is None else f'{m.params:,}':>11}"
                         f"{'-' if m.target is None else f'{m.target:,.0f}':>11}"
                         f"{'-' if ratio is None else f'{ratio:.2f}x':>8}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for MLflow (params and ``chain_plan.json``)."""
        return {
            "steps": self.steps,
            "max_gap": self.max_gap,
            "scale": self.scale,
            "family": self.family,
            "models": [{"role": m.role, "model": m.model.model, "options": dict(m.model.options), "params": m.params,
                        "target": m.target} for m in self.models],
            "ratios": self.ratios,
            "why": self.why,
            "table": self.table(),
        }


def plan_chain(
    teacher: ModelRef,
    student: ModelRef,
    *,
    shape: DataShape,
    max_gap: float,
    scale: Scale = "both",
    max_steps: int = 6,
) -> ChainPlan:
    """Choose the assistants between ``teacher`` and ``student`` (see the module docstring).

    Raises :class:`ConfigError` naming ``chain.max_gap`` / ``chain.max_steps`` / ``student.model`` when no chain
    fits.
    """
    if not max_gap > 1:
        raise ConfigError(f"chain.max_gap: must be > 1 (the largest size ratio allowed between consecutive models), "
                          f"got {max_gap}.")
    scaling = scaling_of(student.model)
    size = functools.partial(ModelRef.count_params, shape=shape)
    t_params, s_params = size(teacher), size(student)
    compression = t_params / s_params
    lower = max(1, math.ceil(math.log(compression) / math.log(max_gap) - 1e-9)) if compression > 1 else 1
    homogeneous = family_of(teacher.model) == scaling.family
    tried = []
    for steps in range(lower, max_steps + 1):
        candidates = [
            fit_assistant(scaling, teacher, student, t_params * (s_params / t_params) ** (i / steps), i / steps,
                          scale, homogeneous, size)
            for i in range(1, steps)
        ]
        assistants = best_fitting(candidates, t_params, s_params, max_gap)
        if assistants is not None:
            why = explain(teacher, student, t_params, s_params, max_gap, lower, steps, scaling, scale, homogeneous)
            return ChainPlan(ChainModel("teacher", teacher, t_params), assistants,
                             ChainModel("student", student, s_params), why, max_gap, scale, scaling.name)
        nearest = [min(c, key=lambda a: abs(math.log(a.params / a.target))) for c in candidates]
        tried.append(f"L={steps}: " + ", ".join(f"{r:.2f}x" for r in step_ratios(nearest, t_params, s_params)))
    raise ConfigError(
        f"chain.max_steps: no chain of at most {max_steps} steps from {teacher.model} ({t_params:,} params) to "
        f"{student.model} ({s_params:,}) keeps every step within chain.max_gap = {max_gap} by scaling "
        f"{scale!r} in the student's family (step ratios of the nearest sizes: {'; '.join(tried) or 'none'}). Raise "
        f"chain.max_steps or chain.max_gap, set chain.scale: both or width, or give chain.assistants by hand."
    )


def step_ratios(assistants: list[ChainModel], t_params: int, s_params: int) -> list[float]:
    sizes = [t_params, *(a.params for a in assistants), s_params]
    return [a / b for a, b in zip(sizes, sizes[1:])]


def best_fitting(candidates: list[list[ChainModel]], t_params: int, s_params: int,
                 max_gap: float) -> list[ChainModel] | None:
    """Of the assistants' candidate models (the buildable sizes either side of each target), the combination whose
    sizes fall strictly from teacher to student with no step above ``max_gap``, nearest its targets (least summed
    |ln(size / target)|); ``None`` if there is none. (Rounding each target to its nearest size alone can break the
    bound where whole channels are coarse.)"""
    if not candidates:  # a single step, within max_gap by the choice of L
        return []
    fitting = [combo for combo in itertools.product(*candidates)
               if all(1 < r <= max_gap for r in step_ratios(list(combo), t_params, s_params))]
    if not fitting:
        return None
    return list(min(fitting, key=lambda combo: sum(abs(math.log(a.params / a.target)) for a in combo)))


def fit_assistant(
    scaling: Scaling,
    teacher: ModelRef,
    student: ModelRef,
    target: float,
    fraction: float,
    scale: Scale,
    homogeneous: bool,
    size: Callable[[ModelRef], int],
) -> list[ChainModel]:
    """The models of the student's family either side of ``target`` parameters for the ``scale`` rule."""
    s_knobs = knobs(student)

    def build(width_units: int, depth: int) -> ModelRef:
        options = {**student.options, scaling.width: scaling.width_value(width_units), DEPTH: depth}
        return replace(student, options=options)

    if scale == "depth":
        units = scaling.width_units(s_knobs[scaling.width])
        found = around(lambda k: build(units, scaling.depth_start + k * scaling.depth_step), 0, target, size)
    else:
        depth = s_knobs[DEPTH]
        if scale == "both" and homogeneous:
            t_depth = knobs(teacher)[DEPTH]
            depth = scaling.snap_depth(t_depth ** (1 - fraction) * depth ** fraction)
        found = around(lambda units: build(units, depth), 1, target, size)
    return [ChainModel("assistant", model, params, target) for model, params in found]


def around(build: Callable[[int], ModelRef], lowest: int, target: float,
           size: Callable[[ModelRef], int]) -> list[tuple[ModelRef, int]]:
    """The models ``build(k)``, ``k >= lowest``, just below and at-or-above ``target`` in size, for a knob whose
    size grows with ``k`` (doubling, then bisection); one model when the smallest is already above the target."""
    low = high = lowest
    while size(build(high)) < target and high < MAX_UNITS:
        low, high = high, lowest + max(1, 2 * (high - lowest))
    while high - low > 1:  # size(build(low)) < target <= size(build(high))
        mid = (low + high) // 2
        if size(build(mid)) < target:
            low = mid
        else:
            high = mid
    return [(model, size(model)) for model in (build(k) for k in sorted({low, high}))]


def explain(teacher: ModelRef, student: ModelRef, t_params: int, s_params: int, max_gap: float, lower: int,
            steps: int, scaling: Scaling, scale: Scale, homogeneous: bool) -> str:
    """The plan's "why", in words."""
    family = scaling.name
    compression = t_params / s_params
    lines = [f"teacher {teacher.model} ({t_params:,} params) -> student {student.model} ({s_params:,} params): "
             f"{compression:.1f}x compression."]
    if steps == 1:
        lines.append(f"{compression:.2f}x is within max_gap {max_gap}: no assistant, the student distils directly.")
        return "\n".join(lines)
    lines.append(f"max_gap {max_gap} needs L >= ceil(ln {compression:.1f} / ln {max_gap}) = {lower} steps"
                 + (f"; L = {steps}: with fewer, the sizes that can be built miss the bound." if steps > lower
                    else f"; L = {steps} keeps every step within it."))
    lines.append(f"targets |theta_T| * r^(i/L), r = {s_params:,}/{t_params:,}, in the student's family ({family}).")
    if scale == "depth":
        lines.append(f"scale 'depth': the student's {scaling.width}, the valid {DEPTH} nearest each target.")
    elif scale == "both" and homogeneous:
        lines.append(f"scale 'both': {DEPTH} interpolated geometrically between the teacher's and the "
                     f"student's, then {scaling.width} solved for the target size.")
    else:
        reason = "" if scale == "width" else " (the teacher is of another family, so its depth says nothing here)"
        lines.append(f"scale '{scale}': the student's {DEPTH}{reason}, {scaling.width} solved for each target.")
    return "\n".join(lines)


def describe_chain(
    teacher: ModelRef,
    assistants: list[ModelRef],
    student: ModelRef,
    *,
    shape: DataShape,
    max_gap: float | None = None,
) -> ChainPlan:
    """The plan of a chain given by hand (TAKD): sizes and step ratios; steps above ``max_gap`` are noted, not
    refused (the hand-given chain is the user's choice)."""
    size = functools.partial(ModelRef.count_params, shape=shape)
    plan = ChainPlan(ChainModel("teacher", teacher, teacher_size(teacher, shape)),
                     [ChainModel("assistant", a, size(a)) for a in assistants],
                     ChainModel("student", student, size(student)), "", max_gap)
    wide = [f"step {i + 1} ({r:.2f}x)" for i, r in enumerate(plan.ratios)
            if max_gap is not None and r is not None and r > max_gap]
    overall = ("the teacher's size is known only once fitted" if plan.teacher.params is None
               else f"{plan.teacher.params / plan.student.params:.1f}x compression in all")
    plan.why = (f"given by hand (chain.assistants): {len(assistants)} assistant(s), {plan.steps} steps, {overall}."
                + (f" Above max_gap {max_gap}: {', '.join(wide)}." if wide else ""))
    return plan


@dataclass(frozen=True)
class ChainDecision:
    """The measured first-link decision (:func:`decide_links`): of the ``planned`` assistants the chain keeps
    ``kept``, from the teacher's and the student alone's validation accuracies and ``min_link_gain`` (ε)."""

    planned: int
    kept: int
    teacher_acc: float
    student_acc: float
    min_link_gain: float
    why: str

    @property
    def gap(self) -> float:
        """The measured relative gap ``G = (Acc_T − Acc_S) / Acc_S``."""
        return relative_gain(self.teacher_acc, self.student_acc)


def decide_links(planned: int, teacher_acc: float, student_acc: float, min_link_gain: float) -> ChainDecision:
    """How many of the ``planned`` assistants the measured gap pays for (module docstring)."""
    gap = relative_gain(teacher_acc, student_acc)
    steps = planned + 1
    affordable = math.floor(math.log1p(gap) / math.log1p(min_link_gain) + 1e-9) if gap > 0 else 1
    kept = max(1, min(steps, affordable)) - 1
    per_step = (1 + gap) ** (1 / steps) - 1 if gap > 0 else 0.0
    measured = (f"Measured on validation: teacher {teacher_acc:.4f}, student alone {student_acc:.4f}, relative gap "
                f"G = {gap:.4f}; min_link_gain ε = {min_link_gain:g}.")
    if kept == planned:
        verdict = (f"The planned {steps} steps carry (1 + G)^(1/{steps}) - 1 = {per_step:.4f} >= ε each: "
                   f"{'every' if planned > 1 else 'the'} assistant pays for itself and is trained.")
    elif kept == 0:
        verdict = (f"G < (1 + ε)^2 - 1 = {(1 + min_link_gain) ** 2 - 1:.4f}: an assistant would sit within ε of the "
                   f"teacher or the student, so it does not pay for itself; no assistant is trained and the student "
                   f"distils from the teachers directly.")
    else:
        verdict = (f"The planned {steps} steps would carry {per_step:.4f} < ε each; the gap pays for {kept + 1} "
                   f"steps: assistants 1..{kept} are trained, the rest skipped.")
    return ChainDecision(planned, kept, teacher_acc, student_acc, min_link_gain, f"{measured} {verdict}")


def relative_gain(acc: float, previous_acc: float) -> float:
    """``(Acc_i − Acc_{i−1}) / Acc_{i−1}`` (HPM-KD, arXiv 2512.09886)."""
    return (acc - previous_acc) / previous_acc if previous_acc > 0 else math.inf


#: the first link whose gain the ε rule tests (the authors' draft does not apply it at i = 1)
FIRST_TESTED_LINK = 2


def stops_after(index: int, gain: float, epsilon: float | None) -> bool:
    """HPM-KD's ε rule (arXiv 2512.09886): after link ``index`` the chain stops adding links when its relative
    validation gain is below ``epsilon``; never after link 1, never when ``epsilon`` is ``None`` (rule off)."""
    return epsilon is not None and index >= FIRST_TESTED_LINK and gain < epsilon


@dataclass(frozen=True)
class ChainLinkInfo:
    """A chain link's record: its ``index``, its relative validation ``gain`` over what it followed, and whether it
    was ``skipped`` (the chain had stopped: it passed its predecessor's model on)."""

    index: int
    gain: float | None = None
    skipped: bool = False

    def stops_chain(self, epsilon: float | None) -> bool:
        """Whether the chain stops after this link: it was skipped (the chain had stopped before it), or it trained
        and :func:`stops_after` stops."""
        return self.skipped or stops_after(self.index, self.gain, epsilon)
