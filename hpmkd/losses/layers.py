"""Which layers a feature method reads, and fetching those features from a :class:`DistillBatch`.

YAML names a layer either by module name (``"layer2"``, any name in ``model.named_modules()``) or by an integer index
into the model's ``ModelTaps.feature_taps`` (negative indices count from the end), so one recipe works for teachers
of different architectures.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from hpmkd.distill_batch import DistillBatch, ModelTaps
from hpmkd.registry import ConfigError

Layer = str | int


def resolve_layer(taps: ModelTaps, choice: Layer | None, option: str) -> str:
    """The module name for ``choice``: a name as is, an index into ``taps.feature_taps``, or (``None``) the middle
    feature tap ``feature_taps[len // 2]``."""
    if isinstance(choice, str):
        return choice
    if choice is not None and (isinstance(choice, bool) or not isinstance(choice, int)):
        raise ConfigError(f"{option}: a layer is a module name or an index into the feature taps; got {choice!r}.")
    if not taps.feature_taps:
        raise ConfigError(f"{option}: this model declares no feature taps; give a module name instead.")
    index = len(taps.feature_taps) // 2 if choice is None else choice
    if not -len(taps.feature_taps) <= index < len(taps.feature_taps):
        raise ConfigError(
            f"{option}: index {index} is out of range for the feature taps {list(taps.feature_taps)} "
            f"(use 0..{len(taps.feature_taps) - 1} or a module name)."
        )
    return taps.feature_taps[index]


def layer_pairs(
    student_taps: ModelTaps,
    teacher_taps: Sequence[ModelTaps],
    pairs: Sequence[Sequence[Layer]] | None,
    option: str,
) -> list[tuple[str, list[str]]]:
    """``[(student layer, [teacher layer per teacher]), ...]``.

    ``pairs`` lists ``[student_layer, teacher_layer]`` entries. ``None`` pairs the last ``k = min(#student taps,
    #teacher taps)`` feature taps of the student and of each teacher in order (deepest stages aligned: our choice).
    """
    if pairs is None:
        k = min([len(student_taps.feature_taps)] + [len(t.feature_taps) for t in teacher_taps])
        if k == 0:
            raise ConfigError(f"{option}: a model declares no feature taps; list the layer pairs explicitly.")
        return [
            (student_taps.feature_taps[n - k], [t.feature_taps[n - k] for t in teacher_taps]) for n in range(k)
        ]
    out = []
    for n, pair in enumerate(pairs):
        if isinstance(pair, (str, int)) or len(pair) != 2:
            raise ConfigError(f"{option}[{n}]: each entry is [student_layer, teacher_layer]; got {pair!r}.")
        s, t = pair
        student = resolve_layer(student_taps, s, f"{option}[{n}][0]")
        out.append((student, [resolve_layer(tt, t, f"{option}[{n}][1]") for tt in teacher_taps]))
    if not out:
        raise ConfigError(f"{option}: needs at least one [student_layer, teacher_layer] pair.")
    return out


def student_feature(batch: DistillBatch, name: str) -> Tensor:
    """The student's tapped output ``name``; a clear error if the distiller did not tap it."""
    try:
        return batch.student_features[name]
    except KeyError:
        raise KeyError(
            f"the student's feature {name!r} was not captured (captured: {sorted(batch.student_features)}). "
            f"The distiller taps what student_tap_names() returns."
        ) from None


def teacher_feature(batch: DistillBatch, teacher: int, name: str) -> Tensor:
    """Teacher ``teacher``'s tapped output ``name``, detached, as a normal tensor.

    Teachers run under ``torch.inference_mode``; inference tensors cannot be saved for backward, so they are cloned.
    """
    features = batch.teachers.features
    if teacher >= len(features) or name not in features[teacher]:
        have = sorted(features[teacher]) if teacher < len(features) else []
        raise KeyError(
            f"teacher {teacher}'s feature {name!r} was not captured (captured: {have}). The teacher source must be "
            f"asked for teacher_tap_names()."
        )
    value = features[teacher][name].detach()
    return value.clone() if value.is_inference() else value


def embedding(feature: Tensor) -> Tensor:
    """An embedding tap's output as ``[B, D]`` (``flatten(1)``)."""
    return feature.flatten(1)
