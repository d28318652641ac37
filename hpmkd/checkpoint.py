"""Reading and writing hpmkd checkpoints, always with ``torch.load(weights_only=True)``.

A stage writes ``state.pt``: the full training state (model, optimiser, scheduler, objective extras, epoch, RNG,
best-so-far weights, per-epoch history), enough to resume. The selected model's weights alone go to ``model.pt``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
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


class CheckpointError(ValueError):
    """A file is not a checkpoint hpmkd can read safely; the message names the file and what to give instead."""


def load(path: str | os.PathLike) -> Any:
    """Load a checkpoint safely (tensors and plain containers only). A file that is not one (text, YAML, empty,
    truncated) or that holds other objects (which ``weights_only`` refuses: unpickling them could run code) raises
    :class:`CheckpointError` naming it; torch's own advice to load it with ``weights_only=False`` is not repeated."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = ("it holds objects other than tensors and plain containers, and loading them could run code"
                  if "Weights only load failed" in str(err) else f"it is not a PyTorch checkpoint ({first_line(err)})")
    except (EOFError, RuntimeError, KeyError, IndexError, ValueError, UnicodeDecodeError) as err:
        reason = f"it is empty, truncated or not a PyTorch checkpoint ({type(err).__name__}: {first_line(err)})"
    raise CheckpointError(f"{path}: cannot be read as a checkpoint: {reason}. Give a model.pt or state.pt written by "
                          f"hpmkd (or torch.save of a state dict).")


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no message"


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
