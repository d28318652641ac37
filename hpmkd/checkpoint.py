"""Reading and writing hpmkd checkpoints, always with ``torch.load(weights_only=True)``.

A stage writes ``state.pt``: the full training state (model, optimiser, scheduler, objective extras, epoch, RNG,
best-so-far weights, per-epoch history), enough to resume. The selected model's weights alone go to ``model.pt``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary name, then rename: a crash never leaves a half-written file under ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (identifies a set of weights whatever its file name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(path: str | os.PathLike) -> Any:
    """Load a checkpoint safely (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in ``path``: a plain state dict (``model.pt``) or a training state (``state.pt``)."""
    return model_state_of(load(path), path)


def model_state_of(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in ``obj``, loaded from ``path`` (see :func:`read_model_state`)."""
    if isinstance(obj, dict) and "best" in obj and isinstance(obj["best"], dict) and "model" in obj["best"]:
        return obj["best"]["model"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path}: not a model checkpoint (expected a state dict, or a dict with 'model').")
