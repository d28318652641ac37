"""Shared setup of the teacher-output benchmarks (``teacher_cache.py``, ``teacher_scaling.py``, ``ray_overhead.py``).

The student is the default experiment's (``cnn``, width 9, strided stem, 8.6k parameters); the benchmark teacher
is ``cnn_small`` with its stem at full resolution (103k parameters), whose forward pass costs 45× the student's in
floating-point operations (15× a whole student training step, taken as 3 forward passes), checked and printed with
the measured times by :func:`print_costs`. Teachers are randomly initialised: these benchmarks
measure time, and the loss checks compare sources of the same teachers. Everything runs on one thread per process,
as a Ray Train worker with ``cpus_per_worker: 1`` does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hpmkd.components.logit_cache import ensure_cached
from hpmkd.components.ray_runtime import ensure_ray
from hpmkd.components.teacher_service import TeacherPool, start_teacher_actors
from hpmkd.config import DataConfig, DistillConfig, TrainConfig
from hpmkd.data import DataSplits, iterate_batches, load_dataset
from hpmkd.models import create_model
from hpmkd.teachers import TeacherSource, TeacherSpec
from hpmkd.training import StageEnv, StageSpec, make_objective, request_teachers, train_stage
from hpmkd.models.ref import DataShape, ModelRef

STUDENT = ModelRef("cnn", {"width": 9, "stem_stride": 2})
TEACHER = ModelRef("cnn_small", {})
BATCH = 128


def build(cfg: ModelRef) -> torch.nn.Module:
    return create_model(cfg.model, num_classes=10, in_channels=1, input_shape=(1, 28, 28), **cfg.options)


def median_ms(step, repeats: int = 7) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def forward_flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return counter.get_total_flops()


def cost_ratios(teacher: ModelRef = TEACHER, student: ModelRef = STUDENT) -> dict[str, float]:
    """Per batch of 128: forward FLOPs of both, and on one thread the measured teacher forward, student forward and
    student training step (ms)."""
    torch.set_num_threads(1)
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    t_net, s_net = build(teacher).eval(), build(student)
    opt = torch.optim.SGD(s_net.parameters(), lr=0.01)

    def train_step() -> None:
        loss = F.cross_entropy(s_net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.inference_mode():
        teacher_ms = median_ms(lambda: t_net(x))
        student_ms = median_ms(lambda: s_net(x))
    return {"teacher_gflops": forward_flops(t_net, x) / 1e9, "student_gflops": forward_flops(s_net, x) / 1e9,
            "teacher_fwd_ms": teacher_ms, "student_fwd_ms": student_ms, "student_step_ms": median_ms(train_step)}


def print_costs(costs: dict[str, float], minimum: float = 10.0) -> None:
    """Print the costs; the teacher's forward pass must be at least ``minimum`` × a whole student training step
    (3 student forward passes) in FLOPs, which do not depend on the machine's load."""
    ratio = costs["teacher_gflops"] / (3 * costs["student_gflops"])
    print(f"cost per batch of {BATCH}: teacher {TEACHER.model} {TEACHER.options} forward {costs['teacher_gflops']:.2f} "
          f"GFLOP, {costs['teacher_fwd_ms']:.1f} ms; student forward {costs['student_gflops']:.3f} GFLOP, "
          f"{costs['student_fwd_ms']:.1f} ms; student training step {costs['student_step_ms']:.1f} ms (1 thread). "
          f"Teacher forward = {ratio:.0f}x a student training step in FLOPs, "
          f"{costs['teacher_fwd_ms'] / costs['student_step_ms']:.1f}x measured")
    assert ratio >= minimum, f"each teacher must cost >= {minimum}x the student, got {ratio:.1f}x"


def images_and_rounds(doc: str, train: int, rounds: int, quick: tuple[int, int], quick_help: str) -> tuple[int, int]:
    """A benchmark timed in rounds: its ``--train`` images and ``--rounds`` from the command line (defaults ``train``
    and ``rounds``), or ``quick`` with ``--quick``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--train", type=int, default=train, help="training images")
    ap.add_argument("--rounds", type=int, default=rounds)
    args = ap.parse_args()
    return quick if args.quick else (args.train, args.rounds)


def data_config(max_train: int, augment: str = "none") -> DataConfig:
    return DataConfig(name="fashion_mnist", max_train=max_train, max_val=500, max_test=1000, augment=augment)


def load(data: DataConfig, seed: int = 0) -> DataSplits:
    return load_dataset(data.name, **data.loader_kwargs(seed))


def save_teachers(count: int, folder: Path) -> tuple[list[TeacherSpec], list[str], list[torch.nn.Module]]:
    """``count`` randomly initialised teachers (seeds 0..count-1), saved as state dicts."""
    folder.mkdir(parents=True, exist_ok=True)
    specs, paths, nets = [], [], []
    for i in range(count):
        spec = TeacherSpec(f"t{i}", TEACHER, DataShape(10, (1, 28, 28)))
        torch.manual_seed(i)
        net = spec.model.build(spec.shape).eval()
        path = folder / f"t{i}.pt"
        torch.save(net.state_dict(), path)
        specs.append(spec)
        paths.append(str(path))
        nets.append(net)
    return specs, paths, nets


def distill_spec(data: DataConfig, teachers: int, epochs: int, seed: int = 0) -> StageSpec:
    """Hinton KD (0.1 CE + 0.9 KD, T = 4) from the mean of ``teachers`` teachers' logits, SGD, batch 128."""
    return StageSpec(name="distill", seed=seed, data=data, model=STUDENT,
                     train=TrainConfig(epochs=epochs, batch_size=BATCH), distill=DistillConfig(),
                     teacher_names=[f"t{i}" for i in range(teachers)], teacher_models=[TEACHER] * teachers)


def start_ray() -> None:
    ensure_ray(None, None, None, log_to_driver=False)


def start_teachers(specs: list[TeacherSpec], weights: list[str], cpus: float = 0.5) -> list[TeacherPool]:
    """One actor per teacher, ``cpus`` CPUs each."""
    return start_teacher_actors(specs, weights, cpus=cpus, gpus=0.0)


def fill_cache(pools: list[TeacherPool], specs: list[TeacherSpec], weights: list[str], splits: DataSplits, root: Path,
               dtype: str = "float32") -> tuple[list[list[str]], float]:
    """Cache entries ``[view][teacher]`` for the plain training split, computed by the actors ``pools``, and the
    seconds it took."""
    began = time.perf_counter()
    uses = ensure_cached(pools, specs, weights, splits.train, root=str(root), fingerprint=splits.fingerprint,
                         dtype=dtype)
    return [[u.path for u in per_view] for per_view in uses], time.perf_counter() - began


def epoch_seconds(spec: StageSpec, teachers: TeacherSource) -> list[float]:
    """Train ``spec`` in this process with ``teachers`` and return each epoch's wall time (validation included)."""
    torch.set_num_threads(1)
    return [h["epoch_time_s"] for h in train_stage(spec, StageEnv(teachers=teachers))["history"]]


def first_batch_loss(spec: StageSpec, teachers: TeacherSource) -> float:
    """The distillation loss of the freshly initialised student on epoch 0's first batch, served by ``teachers``."""
    splits = load(spec.data, spec.seed)
    torch.manual_seed(spec.seed)
    model = spec.model.build(splits.shape)
    objective = make_objective(spec, model, splits)
    x, y, idx = next(iterate_batches(splits.train, BATCH, shuffle=True, seed=spec.seed, epoch=0))
    env = StageEnv(teachers=teachers)
    outputs = request_teachers(env, objective, x, idx)()
    objective.setup(x, y, idx, outputs, total_epochs=spec.train.epochs)
    with torch.no_grad():
        return float(objective(x, y, idx, outputs, epoch=0, total_epochs=spec.train.epochs).loss)
