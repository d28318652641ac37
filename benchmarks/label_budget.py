"""How many labelled images should the default's student see for distillation to pay? (issue 17)

For each student width and label budget (``data.max_train``: a stratified subset of the training split, nested in
larger budgets, the validation and test splits unchanged), this trains the config's student twice per seed: alone
(cross-entropy on its labels) and with plain Hinton KD from one teacher (CE 0.1 + 0.9·T²·KL at T 4, the published
recipe; Hinton, Vinyals, Dean 2015, arXiv 1503.02531), both with the config's ``train`` recipe, in this process with
hpmkd's own training loop (:func:`hpmkd.training.train_stage`, one thread per worker process). The teacher's
logits on the training split are computed once per budget from its shipped checkpoint. Weights are selected on
validation; each model's test split is read once, at the end.

It prints one row per (width, budget): the test accuracy of each seed alone and with KD, and KD − alone; last line
``kd_gain[<width>x<budget>]=<mean points>`` per row.

    python benchmarks/label_budget.py [--config conf/default.yaml] [--budgets 2000 5000 8000 10000]
        [--widths 5 9] [--seeds 0 1] [--teacher cnn] [--workers 2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from hpmkd.config import load_config
from hpmkd.data import load_dataset
from hpmkd.training import StageEnv, StageSpec, train_stage
from search_fidelity import StoredLogits, stored_logits, teacher_weights

ROOT = Path(__file__).resolve().parent.parent
PLAIN_KD = ["distill.ce_weight=0.1", "distill.methods={kd: {weight: 0.9}}",
            "distill.temperature={schedule: fixed, T: 4.0}", "distill.aggregator={name: mean_logits}"]


def test_accuracy(job: tuple[StageSpec, StoredLogits | None]) -> float:
    """Train one spec in this process (one thread); its selected model's test accuracy."""
    spec, teachers = job
    torch.set_num_threads(1)
    return float(train_stage(spec, StageEnv(teachers=teachers))["test_acc"])


def jobs_for(args, width: int, budget: int) -> list[tuple[StageSpec, StoredLogits | None]]:
    """Per seed: the student alone, then the student distilled from ``--teacher``."""
    cfg = load_config(args.config, [*args.overrides, *PLAIN_KD, f"data.max_train={budget}",
                                     f"student.options={{width: {width}, stem_stride: 2}}"])
    teacher = next(t for t in cfg.teachers if t.name == args.teacher)
    only = replace(cfg, teachers=[teacher])
    splits = load_dataset(cfg.data.name, **cfg.data.loader_kwargs(cfg.seed))
    folder = Path(cfg.output_dir).resolve() / "label_budget"
    folder.mkdir(parents=True, exist_ok=True)
    logits = StoredLogits([teacher.name], stored_logits(only, splits, teacher_weights(only, splits, folder)))
    recipe = cfg.recipe()
    jobs = []
    for seed in args.seeds:
        jobs.append((StageSpec("student_alone", seed, cfg.data, cfg.student.ref, cfg.train), None))
        jobs.append((StageSpec("distill", seed, cfg.data, cfg.student.ref, recipe.train, recipe.distill,
                               teacher_names=[teacher.name], teacher_models=[teacher.ref]), logits))
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "default.yaml"))
    ap.add_argument("--budgets", type=int, nargs="+", default=[2000, 5000, 8000, 10000])
    ap.add_argument("--widths", type=int, nargs="+", default=[5, 9])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--teacher", default="cnn")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    grid = [(w, b) for w in args.widths for b in args.budgets]
    jobs = [job for w, b in grid for job in jobs_for(args, w, b)]
    with ProcessPoolExecutor(args.workers) as pool:
        accs = list(pool.map(test_accuracy, jobs))
    per_row = 2 * len(args.seeds)
    print(f"test accuracy % per seed ({' / '.join(map(str, args.seeds))}); teacher {args.teacher}, plain KD")
    print("| width | labelled images | alone | plain KD | KD − alone (points) |")
    print("|---|---|---|---|---|")
    gains = {}
    for i, (w, b) in enumerate(grid):
        row = accs[i * per_row:(i + 1) * per_row]
        alone, kd = row[0::2], row[1::2]
        gain = [100 * (k - a) for a, k in zip(alone, kd)]
        gains[f"{w}x{b}"] = statistics.mean(gain)
        print(f"| {w} | {b:,} | {' / '.join(f'{100 * a:.2f}' for a in alone)} | "
              f"{' / '.join(f'{100 * k:.2f}' for k in kd)} | {' / '.join(f'{g:+.2f}' for g in gain)} |")
    for key, gain in gains.items():
        print(f"kd_gain[{key}]={gain:.2f}")


if __name__ == "__main__":
    main()
