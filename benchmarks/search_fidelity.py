"""Do the configuration manager's trials rank configurations the way the full distillation would? (issue 17)

For ``--configs`` configurations of the config's search space (``config_manager.search_space``: a seeded Latin
hypercube on each dimension's scale, the published defaults first), this trains:

* the **full run**: the distillation recipe with the configuration, its whole schedule on the whole training split,
  from the config's teachers, exactly what the ``distill`` stage trains after the search; its best validation
  accuracy is what the search should rank configurations by;
* one **trial** per ``--fidelity EPOCHS:FRACTION`` (``EPOCHS`` a number, or ``full`` for the stage's epochs;
  ``FRACTION`` of the training split), built by :func:`hpmkd.search_trials.trial_spec`, the function the ``tune`` stage
  uses: ``2:1`` is hpmkd's trial before issue 17 (2 epochs, the schedule compressed to them, all the data),
  ``full:0.25`` the whole schedule on a stratified quarter of the training split (the trial since).

It prints each configuration's scores, then per fidelity Spearman's rank correlation ρ between the trial score (the
best validation accuracy, as Tune compares trials) and the full run's, with its cost (training images seen) relative
to the full run. Last lines: ``rho[<fidelity>]=<ρ>``. The teachers are the config's: loaded from their checkpoints,
or trained here first; their logits on the training split are computed once (as the logit cache serves them, in
``distill.cache_dtype``). Everything runs in ``--workers`` processes of one thread each; the test split is never
read.

    python benchmarks/search_fidelity.py [--config conf/default.yaml] [--configs 10] [--fidelity 2:1 full:0.25]
        [--workers 2] [--set key=value ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scipy.stats import qmc, spearmanr

from hpmkd.config import ExperimentConfig, load_config
from hpmkd.data import DataSplits, load_dataset
from hpmkd.distill_batch import TeacherOutputs
from hpmkd.predictors import load_predictor
from hpmkd.search_space import SearchSpace, build_space
from hpmkd.teachers import frozen
from hpmkd.training import StageEnv, StageSpec, train_stage
from hpmkd.search_trials import trial_spec

ROOT = Path(__file__).resolve().parent.parent
FULL = "full"


class StoredLogits:
    """The teachers' logits on the training split, computed once and served by row index (what the logit cache does
    for the ``distill`` and ``tune`` stages, held in memory here)."""

    def __init__(self, names: list[str], logits: torch.Tensor):
        self.names = names
        self.logits = logits  # [M, N, K]

    def request(self, x: torch.Tensor, index: torch.Tensor, taps: Any, view: int = 0):
        out = TeacherOutputs(self.logits[:, index], [{} for _ in self.names])
        return lambda: out


@dataclass(frozen=True)
class Fidelity:
    epochs: int | None  # None: the stage's own epochs
    fraction: float

    @classmethod
    def parse(cls, text: str) -> "Fidelity":
        epochs, _, fraction = text.partition(":")
        return cls(None if epochs == FULL else int(epochs), float(fraction or 1.0))

    def label(self) -> str:
        return f"{FULL if self.epochs is None else self.epochs}:{self.fraction:g}"

    def cost(self, full_epochs: int) -> float:
        """Training images seen, relative to the full run."""
        return (full_epochs if self.epochs is None else self.epochs) * self.fraction / full_epochs


def teacher_weights(cfg: ExperimentConfig, splits: DataSplits, folder: Path) -> list[str]:
    """A weights file per teacher: its checkpoint, or the selected weights of training it here."""
    paths = []
    for i, teacher in enumerate(cfg.teachers):
        if teacher.checkpoint:
            paths.append(teacher.checkpoint)
            continue
        kept: dict[str, Any] = {}
        spec = StageSpec(f"teacher_{teacher.name}", cfg.seed, cfg.data, teacher.ref, cfg.teacher_train(i),
                         read_test=False)
        train_stage(spec, StageEnv(report=lambda metrics, state: kept.update(state=state)))
        path = folder / f"{teacher.name}.pt"
        torch.save(kept["state"]["best"]["model"], path)
        paths.append(str(path))
    return paths


@torch.inference_mode()
def stored_logits(cfg: ExperimentConfig, splits: DataSplits, paths: list[str]) -> torch.Tensor:
    """``[M, N, K]`` logits of the teachers on the training split, rounded to ``distill.cache_dtype``."""
    out = []
    for teacher, path in zip(cfg.teachers, paths):
        model = frozen(load_predictor(path, teacher.ref, splits.shape))
        out.append(torch.cat([model(x) for x, _, _ in splits.train.batches(1024, shuffle=False)]))
    return torch.stack(out).to(getattr(torch, cfg.distill.cache_dtype)).float()


def configurations(space: SearchSpace, count: int, seed: int) -> list[dict[str, float]]:
    """The published defaults, then a seeded Latin hypercube on the unit scale of each dimension."""
    unit = qmc.LatinHypercube(d=len(space.dims), seed=seed).random(count - 1)
    return [space.defaults(), *(space.from_unit(u) for u in unit)]


def score(job: tuple[StageSpec, StoredLogits]) -> tuple[float, float]:
    """Train one spec in this process (one thread): its best validation accuracy and seconds."""
    spec, teachers = job
    torch.set_num_threads(1)
    began = time.perf_counter()
    result = train_stage(spec, StageEnv(teachers=teachers))
    return float(result["val_acc"]), time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "default.yaml"))
    ap.add_argument("--configs", type=int, default=10, help="configurations, the published defaults among them")
    ap.add_argument("--fidelity", nargs="+", default=["2:1", "full:0.25"], help="EPOCHS:FRACTION per trial kind")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", default=None, help="also write every score here")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    splits = load_dataset(cfg.data.name, **cfg.data.loader_kwargs(cfg.seed))
    folder = Path(cfg.output_dir).resolve() / "search_fidelity"
    folder.mkdir(parents=True, exist_ok=True)
    teachers = StoredLogits(cfg.teacher_names(), stored_logits(cfg, splits, teacher_weights(cfg, splits, folder)))
    space, recipe = build_space(cfg), cfg.recipe()
    base = StageSpec("trial", cfg.seed, cfg.data, cfg.student.ref, recipe.train, recipe.distill,
                     teacher_names=cfg.teacher_names(), teacher_models=[t.ref for t in cfg.teachers], read_test=False)
    configs = configurations(space, args.configs, cfg.seed)
    fidelities = [Fidelity(None, 1.0), *map(Fidelity.parse, args.fidelity)]
    epochs = recipe.train.epochs
    jobs = [(trial_spec(base, recipe, space.overrides(c), f.epochs or epochs, f.fraction), teachers)
            for f in fidelities for c in configs]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(score, jobs))
    scores = {f.label(): results[i * len(configs):(i + 1) * len(configs)] for i, f in enumerate(fidelities)}
    full = [s for s, _ in scores[fidelities[0].label()]]
    print(f"{len(configs)} configurations of {', '.join(space.names)}; full run: {epochs} epochs on "
          f"{len(splits.train):,} images; score: best validation accuracy (%)")
    print(" | ".join([*space.names, *scores]))
    for i, c in enumerate(configs):
        print(" | ".join([*(f"{c[n]:.4g}" for n in space.names), *(f"{s[i][0] * 100:.2f}" for s in scores.values())]))
    out = {"configs": configs, "scores": {k: [s for s, _ in v] for k, v in scores.items()}, "rho": {}}
    for f in fidelities[1:]:
        trial = [s for s, _ in scores[f.label()]]
        rho = float(spearmanr(trial, full).statistic)
        seconds = sum(t for _, t in scores[f.label()]) / sum(t for _, t in scores[fidelities[0].label()])
        out["rho"][f.label()] = rho
        print(f"fidelity {f.label()}: cost {f.cost(epochs):.2f} of a full run in images ({seconds:.2f} in seconds); "
              f"Spearman rho vs full = {rho:.3f}")
    for label, rho in out["rho"].items():
        print(f"rho[{label}]={rho:.3f}" if not math.isnan(rho) else f"rho[{label}]=nan")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
