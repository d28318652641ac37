"""State dicts: loading one with an error that says which layer does not fit, and a digest of their contents."""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from torch import Tensor, nn


def state_mismatch(model: nn.Module, state_dict: Mapping[str, Tensor]) -> str | None:
    """The first entry where ``state_dict`` does not fit ``model`` (in the model's order, then the checkpoint's), or
    ``None`` when every entry is present with the right shape."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state_dict:
            return f"layer {key!r} (shape {list(value.shape)}) is missing from the checkpoint"
        got = state_dict[key]
        if tuple(got.shape) != tuple(value.shape):
            return f"layer {key!r} has shape {list(got.shape)} in the checkpoint but {list(value.shape)} in the model"
    for key in state_dict:
        if key not in expected:
            return f"the checkpoint has a layer {key!r} that the model does not have"
    return None


def load_state_checked(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """``model.load_state_dict(state_dict)`` (strict), but a mismatch raises a short :class:`ValueError` naming
    the first layer that does not fit, instead of torch's list of every key."""
    problem = state_mismatch(model, state_dict)
    if problem is not None:
        raise ValueError(
            f"checkpoint does not fit {type(model).__name__}: {problem}. The checkpoint was made for a different "
            f"model (or other options: num_classes, in_channels, depth, width); build the model it was trained with."
        )
    model.load_state_dict(state_dict)


def state_digest(state_dict: Mapping[str, Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and values: the same digest for the same weights, whatever
    file or process they are in."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()
