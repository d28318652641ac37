"""Frozen teachers served by Ray actors.

A :class:`TeacherActor` holds one teacher, any :class:`hpmkd.teachers.TeacherProvider` (weights read safely in the
driver and shipped once through the object store; a torch teacher in eval mode, no gradients, on a GPU when the
actor was given one; ``ray.teacher_gpus`` may be a fraction so several teachers share a GPU) and answers whole
batches with logits (and named feature maps when a method asks for them), one forward pass per batch. Inputs and
outputs travel as NumPy arrays: Ray passes them zero-copy through shared memory on the same node.

A teacher that is the bottleneck gets several identical replicas (``ray.teacher_replicas``): a :class:`TeacherPool`
sends each request to the next replica in turn, so consecutive batches (the one being waited for and the one
prefetched), several training workers, or the chunks of a cache fill run on different replicas at once.
:class:`ActorTeachers` is the :class:`hpmkd.teachers.TeacherSource` that training workers use: it sends a batch to
every teacher at once and returns a waiter, so teachers compute the next batch while the student trains on this one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import ray
import torch

from hpmkd.distill_batch import TeacherOutputs
from hpmkd.teachers import Pending, TeacherSpec, provider_for


#: a teacher actor whose process dies is restarted (its weights reloaded from the object store) this many times, and
#: the calls it had not answered are sent again: ``forward`` is a pure function of the batch and the frozen weights, so
#: a retried call returns exactly what the lost one would have, and no batch is trained on missing outputs.
ACTOR_RESTARTS = 3


@ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
class TeacherActor:
    """Hosts one frozen teacher (any :data:`hpmkd.teachers.PROVIDERS` kind) and serves its outputs for batches;
    restarted when its process dies (:data:`ACTOR_RESTARTS`). ``served`` counts the batches since its last start."""

    def __init__(self, spec: TeacherSpec, weights: Any, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        # Batches arrive as read-only zero-copy views of shared memory; the model only reads them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.teacher = provider_for(spec.model).build(spec, weights).to(self.device)
        self.batches = 0

    def forward(self, x: np.ndarray, taps: Sequence[str] = ()) -> dict[str, Any]:
        """``{"logits": [B, C] float32, "features": {tap: array}}`` for the batch ``x``."""
        self.batches += 1
        logits, feats = self.teacher.forward(torch.from_numpy(x).to(self.device), taps)
        return {
            "logits": logits.float().cpu().numpy(),
            "features": {k: v.float().cpu().numpy() for k, v in feats.items()},
        }

    def name(self) -> str:
        return self.spec.name

    def served(self) -> int:
        """How many batches this actor has answered."""
        return self.batches


@dataclass
class TeacherPool:
    """The identical replicas of one teacher; :meth:`submit` sends each request to the next one (round robin).
    ``weights``: the object reference of the weights, held while the pool lives so that a restarted replica can
    load them again."""

    name: str
    replicas: list[Any]
    turn: int = 0
    weights: Any = None

    def submit(self, x: Any, taps: Sequence[str] = ()) -> ray.ObjectRef:
        """Ask the next replica for the outputs on ``x`` (an array or an object reference to one)."""
        actor = self.replicas[self.turn % len(self.replicas)]
        self.turn += 1
        return actor.forward.remote(x, list(taps))



def release(pools: list[TeacherPool]) -> None:
    """End every replica of every pool."""
    for pool in pools:
        for actor in pool.replicas:
            ray.kill(actor)


def put_checked_weights(spec: TeacherSpec, path: str) -> ray.ObjectRef:
    """The teacher's weights read by its provider (safely: ``weights_only=True`` for torch), checked by building the
    teacher once (an error names the layer before any process starts), and put in the object store."""
    provider = provider_for(spec.model)
    payload = provider.read(path)
    provider.build(spec, payload)
    return ray.put(payload)


def start_teacher_actors(
    specs: list[TeacherSpec], checkpoints: list[str], cpus: float, gpus: float, replicas: int = 1
) -> list[TeacherPool]:
    """``replicas`` actors per teacher; weights read here by the teacher's provider (safely: ``weights_only=True``
    for torch), checked by building the teacher once, put in the object store once per teacher and shared by its
    replicas."""
    pools = []
    for spec, path in zip(specs, checkpoints):
        ref = put_checked_weights(spec, path)
        actor = TeacherActor.options(num_cpus=cpus, num_gpus=gpus)
        pools.append(TeacherPool(spec.name, [actor.remote(spec, ref, max(1, int(cpus))) for _ in range(replicas)],
                                 weights=ref))
    ray.get([a.name.remote() for p in pools for a in p.replicas])  # wait until every model is loaded (errors surface here)
    return pools


class ActorTeachers:
    """A :class:`hpmkd.teachers.TeacherSource` backed by :class:`TeacherPool` s (one per teacher).

    ``start`` offsets the round robin (training workers pass their rank, so they begin on different replicas).
    """

    def __init__(self, names: list[str], pools: list[TeacherPool], start: int = 0):
        self.names = names
        self.pools = pools
        for pool in pools:
            pool.turn = start

    def request(self, x: torch.Tensor, index: torch.Tensor, taps: Sequence[Sequence[str]], view: int = 0) -> Pending:
        ref = ray.put(x.detach().cpu().numpy())  # one copy into the object store, shared by every teacher
        refs = [p.submit(ref, taps[i] if taps else ()) for i, p in enumerate(self.pools)]

        def wait() -> TeacherOutputs:
            outs = ray.get(refs)
            logits = torch.from_numpy(np.stack([o["logits"] for o in outs]))
            feats = [{k: torch.from_numpy(np.array(v)) for k, v in o["features"].items()} for o in outs]
            return TeacherOutputs(logits, feats)

        return wait
