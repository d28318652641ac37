"""Frozen teachers served by Ray actors.

One :class:`TeacherActor` per teacher holds the model (weights shipped once through the object store, loaded with
``weights_only=True``, eval mode, no gradients) and answers batches with logits (and named feature maps when a
method asks for them). Inputs and outputs travel as NumPy arrays: Ray passes them zero-copy through shared memory on
the same node (see shared/RAY_MLFLOW.md §3). :class:`ActorTeachers` is the :class:`hpmkd.teachers.TeacherSource`
that training workers use: it sends a batch to every teacher at once and returns a waiter, so teachers compute the
next batch while the student trains on the current one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import ray
import torch

from hpmkd.checkpoint import read_model_state
from hpmkd.config import ModelConfig
from hpmkd.distill_batch import TeacherOutputs
from hpmkd.models import create_model, load_state_checked
from hpmkd.teachers import Pending, frozen, teacher_forward


@dataclass
class TeacherSpec:
    """What builds a teacher: its name, architecture and the data shape it was trained for."""

    name: str
    model: ModelConfig
    num_classes: int
    input_shape: tuple[int, ...]

    def build(self) -> torch.nn.Module:
        return create_model(
            self.model.model,
            num_classes=self.num_classes,
            in_channels=self.input_shape[0],
            input_shape=self.input_shape,
            **self.model.options,
        )


@ray.remote
class TeacherActor:
    """Hosts one frozen teacher and serves its outputs for batches."""

    def __init__(self, spec: TeacherSpec, state_dict: dict[str, torch.Tensor], threads: int = 1):
        torch.set_num_threads(max(1, threads))
        # Batches arrive as read-only zero-copy views of shared memory; the model only reads them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        model = spec.build()
        load_state_checked(model, state_dict)
        self.model = frozen(model).to(self.device)

    def forward(self, x: np.ndarray, taps: Sequence[str] = ()) -> dict[str, Any]:
        """``{"logits": [B, C] float32, "features": {tap: array}}`` for the batch ``x``."""
        logits, feats = teacher_forward(self.model, torch.from_numpy(x).to(self.device), taps)
        return {
            "logits": logits.float().cpu().numpy(),
            "features": {k: v.float().cpu().numpy() for k, v in feats.items()},
        }

    def name(self) -> str:
        return self.spec.name


def start_teacher_actors(
    specs: list[TeacherSpec], checkpoints: list[str], cpus: float, gpus: float
) -> list[ray.actor.ActorHandle]:
    """One actor per teacher; weights read here (``weights_only=True``) and shipped through the object store."""
    actors = []
    for spec, path in zip(specs, checkpoints):
        state = read_model_state(path)
        load_state_checked(spec.build(), state)  # fail here, naming the layer, before any actor starts
        actors.append(
            TeacherActor.options(num_cpus=cpus, num_gpus=gpus).remote(spec, ray.put(state), max(1, int(cpus)))
        )
    ray.get([a.name.remote() for a in actors])  # wait until every model is loaded (errors surface here)
    return actors


class ActorTeachers:
    """A :class:`hpmkd.teachers.TeacherSource` backed by :class:`TeacherActor` handles."""

    def __init__(self, names: list[str], actors: list[ray.actor.ActorHandle]):
        self.names = names
        self.actors = actors

    def request(self, x: torch.Tensor, index: torch.Tensor, taps: Sequence[Sequence[str]]) -> Pending:
        ref = ray.put(x.detach().cpu().numpy())  # one copy into the object store, shared by every teacher
        refs = [a.forward.remote(ref, list(taps[i]) if taps else []) for i, a in enumerate(self.actors)]

        def wait() -> TeacherOutputs:
            outs = ray.get(refs)
            logits = torch.from_numpy(np.stack([o["logits"] for o in outs]))
            feats = [{k: torch.from_numpy(np.array(v)) for k, v in o["features"].items()} for o in outs]
            return TeacherOutputs(logits, feats)

        return wait
