"""Meta-features of a distillation task: what the adaptive configuration manager compares to find similar past stages.

HPM-KD's Adaptive Configuration Manager (Haase & Dourado da Silva, arXiv 2512.09886; authors' draft
``guhaase/papers-deepbridge`` ``01_HPM-KD_Framework/POR/sections/04-methodology.tex``) describes a task by dataset
meta-features (size, dimension, number of classes, imbalance ρ = max_k p_k / min_k p_k, label entropy
−Σ p_k log p_k) and model meta-features (teacher and student parameter counts, their ratio, the architecture, the
teacher's accuracy). A :class:`TaskFeatures` holds exactly those, plus the distillation methods, for one
(data, teachers, student) task.

Our choices (the paper's list is kept; its feature mean/var/skew/kurtosis are left out because the data are already
standardised per channel): the label entropy is normalised by ``log K`` (1 = balanced); sizes and ratios enter the
numeric vector as logarithms; teacher accuracy is the *validation* accuracy (tuning never reads the test split).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

#: names of :meth:`TaskFeatures.numeric`, in order (the vector nearest neighbours and the regressor use)
NUMERIC_FEATURES = (
    "log_n_train",
    "log_classes",
    "log_input_dim",
    "label_entropy",
    "log_imbalance",
    "teacher_acc_best",
    "teacher_acc_mean",
    "log_teacher_params",
    "log_student_params",
    "log_size_ratio",
    "num_teachers",
)


def model_family(name: str) -> str:
    """The architecture family of a model name: its leading letters (``cnn_small`` -> ``cnn``, ``resnet8x4`` ->
    ``resnet``, ``wrn_16_1`` -> ``wrn``, ``mobilenet_v2`` -> ``mobilenet``). Our choice: names in hpmkd's zoo and in
    torchvision start with their family."""
    found = re.match(r"[a-z]+", name.lower())
    return found.group(0) if found else name


def label_statistics(labels: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """``(H(y) / log K, max_k p_k / min_k p_k)`` of the class frequencies ``p_k`` (a missing class counts as one
    sample, so ρ stays finite)."""
    counts = torch.bincount(labels.long(), minlength=num_classes).double().clamp_min(1.0)
    p = counts / counts.sum()
    entropy = float(-(p * p.log()).sum()) / math.log(num_classes) if num_classes > 1 else 1.0
    return entropy, float(counts.max() / counts.min())


@dataclass(frozen=True)
class TaskFeatures:
    """One distillation task: the data, the teachers and the student (not the recipe, not the outcome)."""

    dataset: str
    n_train: int
    num_classes: int
    input_shape: tuple[int, ...]
    label_entropy: float
    imbalance: float
    teacher_models: tuple[str, ...]
    teacher_params: tuple[int, ...]
    teacher_acc: tuple[float, ...]
    student_model: str
    student_params: int
    methods: tuple[str, ...]

    @property
    def student_family(self) -> str:
        return model_family(self.student_model)

    @property
    def size_ratio(self) -> float:
        """Largest teacher's parameters over the student's (the compression of HPM-KD's ``r``)."""
        return max(self.teacher_params) / max(1, self.student_params)

    def numeric(self) -> np.ndarray:
        """The numeric meta-feature vector, in the order of :data:`NUMERIC_FEATURES`."""
        values = {
            "log_n_train": math.log(self.n_train),
            "log_classes": math.log(self.num_classes),
            "log_input_dim": math.log(math.prod(self.input_shape)),
            "label_entropy": self.label_entropy,
            "log_imbalance": math.log(self.imbalance),
            "teacher_acc_best": max(self.teacher_acc),
            "teacher_acc_mean": sum(self.teacher_acc) / len(self.teacher_acc),
            "log_teacher_params": math.log(max(self.teacher_params)),
            "log_student_params": math.log(self.student_params),
            "log_size_ratio": math.log(self.size_ratio),
            "num_teachers": float(len(self.teacher_models)),
        }
        return np.array([values[name] for name in NUMERIC_FEATURES], dtype=np.float64)

    def task_id(self) -> str:
        """Identifies the task across seeds and recipes: data set and size, teacher and student architectures,
        methods (not the accuracies, which change with the seed)."""
        identity = (self.dataset, self.n_train, self.num_classes, self.input_shape, self.teacher_models,
                    self.teacher_params, self.student_model, self.student_params, self.methods)
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskFeatures":
        tuples = ("input_shape", "teacher_models", "teacher_params", "teacher_acc", "methods")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})
