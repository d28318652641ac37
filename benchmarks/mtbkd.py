"""MT-BKD against the usual baselines on ``conf/mtbkd.yaml`` (Fashion-MNIST, a CNN and an MLP teacher, the default
student), over seeds; and the coverage of its 95 % credible intervals on the synthetic task with known class
probabilities (``conf/mtbkd_synthetic.yaml``). Issue 13's measurement.

Per seed, every row is a real pipeline run's stage in one MLflow store (experiment ``mtbkd-benchmark``; the
teachers and the student alone are trained once per seed and reused by content key):

* **student alone**: the ``mtbkd`` run's ``student_alone``;
* **plain KD (mean of teachers)**: ``pipeline: kd``, ``L = 0.5 CE + 0.5 T² KL`` at ``T = 2`` from the mean of the
  teachers' logits (conf/kd.yaml's recipe);
* **EBKD (entropy weights + KD)**: the same with the ``entropy`` aggregator (per-teacher KD weighted by entropy);
* **KD + temperature scaling**: the plain-KD student with one temperature fitted on the validation NLL
  (:mod:`hpmkd.calibration`), measured here by the same test metrics;
* **MT-BKD, mode only**: ``pipeline: mtbkd`` with ``mtbkd.sample_epochs: 0`` (the posterior mode, best epoch);
* **MT-BKD + SGLD, 1 chain** and **MT-BKD + SGLD, 2 chains pooled**: conf/mtbkd.yaml as shipped (its first chain's
  stage, and the pool);
* **deep ensemble of 4 students alone**: ``mtbkd.deep_ensemble: 4`` in the same run (``student_alone`` and three
  more initialisations, pooled).

Columns, all from the MLflow records: test accuracy, NLL, ECE (15 bins), Brier, AUROC of the predictive entropy for
the model's own errors, accuracy at 90 % coverage, coverage and size of the 95 % prediction sets calibrated on
validation; the same under Gaussian noise and blur; and the cost: the seconds of the row's own stages (summed: a
chain pair or an ensemble counts every member; the teachers, shared by every row, are left out). Then the issue's
goals, each with its number. Stages run side by side where the CPUs allow (each on one thread, so two stages on two
cores barely slow each other); ``--sequential`` runs one at a time.

The synthetic part runs ``conf/mtbkd_synthetic.yaml`` per seed with a 4-member deep ensemble: the reference's SGLD
(ε₁ = 8e-8, ε₂ = 4e-4) over the head (as the reference) and over all parameters, and SGLD over all parameters at a
step size that mixes on this task (ε₁ = 2e-5, ε₂ = √(2 ε₁); our choice); it prints the credible intervals' coverage
of the true class probabilities and their width.

    python benchmarks/mtbkd.py [--seeds 0 1 2] [--quick] [--tracking-uri URI] [--part all|main|synthetic]
                               [--sequential] [--set KEY=VALUE ...] [--synthetic-seeds 0 ...]
                               [--synthetic-set KEY=VALUE ...]

``--set`` overrides apply to the Fashion-MNIST runs, ``--synthetic-set`` to the synthetic ones (after the deep
ensemble of 4, so ``--synthetic-set mtbkd.deep_ensemble=0`` leaves it out).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.entities import Run

from hpmkd.calibration import TemperatureScaled, fit_temperature
from hpmkd.components.tracking import child_runs, default_tracking_uri
from hpmkd.config import ExperimentConfig, load_config
from hpmkd.data import load_dataset
from hpmkd.evaluation import final_test_metrics, predict
from hpmkd.pipelines.runner import run_experiment
from hpmkd.predictors import load_predictor
from kd_vs_alone import add_seeded_run_args, seeds_of

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "mtbkd-benchmark"
KD_RECIPE = ["distill.ce_weight=0.5", "distill.methods={kd: {weight: 0.5}}",
             "distill.temperature={schedule: fixed, T: 2.0}"]
QUICK = ["data.max_train=1500", "data.max_val=300", "data.max_test=1000", "train.epochs=2",
         "teachers.0.train={epochs: 1}", "teachers.1.train={epochs: 1}", "mtbkd.sample_epochs=2",
         "mtbkd.burn_in=4", "mtbkd.samples=4"]
SYNTHETIC_QUICK = ["train.epochs=2", "teachers.0.train={epochs: 2}", "teachers.1.train={epochs: 2}",
                   "mtbkd.sample_epochs=1", "mtbkd.burn_in=4", "mtbkd.samples=4"]
#: synthetic-task variants: label -> overrides of conf/mtbkd_synthetic.yaml
SYNTHETIC_VARIANTS = {
    "head, reference step": [],
    "all parameters, reference step": ["mtbkd.params=all"],
    "all parameters, eps1 = 2e-5": ["mtbkd.params=all", "mtbkd.sampler={optimizer: sgld, lr: 2.0e-5}"],
}
ALONE, KD, EBKD, TS = "student alone", "plain KD (mean of teachers)", "EBKD (entropy weights + KD)", \
    "KD + temperature scaling"
MODE, ONE_CHAIN, TWO_CHAINS, ENSEMBLE = "MT-BKD, mode only", "MT-BKD + SGLD, 1 chain", \
    "MT-BKD + SGLD, 2 chains pooled", "deep ensemble of 4 students alone"
#: the rows whose model is one student architecture (the deep ensemble is four students)
SINGLE_STUDENT = (ALONE, KD, EBKD, TS, MODE, ONE_CHAIN, TWO_CHAINS)
SAMPLED = (ONE_CHAIN, TWO_CHAINS)
#: clean columns: (title, test metric key, scale, format)
CLEAN = (("acc %", "acc", 100, ".2f"), ("NLL", "nll", 1, ".4f"), ("ECE", "ece", 1, ".4f"), ("Brier", "brier", 1, ".4f"),
         ("err. AUROC", "error_auroc", 1, ".3f"), ("acc@90 %", "selective_acc", 100, ".2f"),
         ("set cov.", "set_coverage", 1, ".3f"), ("set size", "set_size", 1, ".2f"))
SHIFTED = (("acc %", "acc", 100, ".2f"), ("NLL", "nll", 1, ".3f"), ("ECE", "ece", 1, ".4f"),
           ("err. AUROC", "error_auroc", 1, ".3f"), ("set cov.", "set_coverage", 1, ".3f"),
           ("set size", "set_size", 1, ".2f"), ("entropy", "predictive_entropy", 1, ".3f"))


@dataclass
class Measured:
    """One row's model for one seed: its test metrics (keys without the ``test_`` prefix) and its cost in seconds."""

    metrics: dict[str, float]
    cost_s: float


def seconds(run: Run) -> float:
    return (run.info.end_time - run.info.start_time) / 1000


def stages_of(client: MlflowClient, summary: dict) -> dict[str, Run]:
    experiment = client.get_experiment_by_name(summary["experiment"]).experiment_id
    return child_runs(client, experiment, summary["parent_run_id"])


def computed(client: MlflowClient, run: Run) -> Run:
    """The run that computed a stage (itself, or the run a reused stage came from)."""
    source = run.data.tags.get("reused_from") if run.data.tags.get("reused") == "true" else None
    return client.get_run(source) if source else run


def measured(client: MlflowClient, runs: dict[str, Run], main: str, cost_stages: list[str]) -> Measured:
    metrics = {k.removeprefix("test_"): v for k, v in computed(client, runs[main]).data.metrics.items()
               if k.startswith("test_")}
    return Measured(metrics, sum(seconds(computed(client, runs[s])) for s in cost_stages))


def temperature_scaled(client: MlflowClient, cfg: ExperimentConfig, run: Run, folder: Path) -> Measured:
    """The KD student of ``run`` with a temperature fitted on validation, measured like every final stage."""
    source = computed(client, run)
    path = client.download_artifacts(source.info.run_id, "checkpoint/model.pt", str(folder))
    splits = load_dataset(cfg.data.name, **cfg.data.loader_kwargs(cfg.seed))
    predictor = load_predictor(path, cfg.student.ref, splits.shape)
    cpu, batch = torch.device("cpu"), cfg.train.eval_batch_size
    began = time.perf_counter()
    val = predict(predictor, splits.val, batch, cpu)
    temperature = fit_temperature(val.log_probs, val.y)
    fit_s = time.perf_counter() - began
    metrics = final_test_metrics(TemperatureScaled(predictor, temperature), splits, batch, cpu, cfg.evaluation)
    print(f"  temperature scaling: T = {temperature:.3f} (fitted in {fit_s:.1f} s)")
    return Measured({k.removeprefix("test_"): v for k, v in metrics.items()}, seconds(source) + fit_s)


def run_seed(config: str, seed: int, common: list[str], uri: str, folder: Path) -> dict[str, Measured]:
    """Every row of one seed."""
    client = MlflowClient(uri)

    def run(*overrides: str) -> dict[str, Run]:
        cfg = load_config(config, [*common, f"seed={seed}", *overrides])
        return stages_of(client, run_experiment(cfg, tracking_uri=uri))

    full = run("mtbkd.deep_ensemble=4")
    mode = run("mtbkd.sample_epochs=0", "mtbkd.chains=1")
    kd = run("pipeline=kd", *KD_RECIPE, "distill.aggregator={name: mean_logits}")
    ebkd = run("pipeline=kd", *KD_RECIPE, "distill.aggregator={name: entropy}")
    members = ["student_alone", "ensemble_2", "ensemble_3", "ensemble_4", "deep_ensemble"]
    kd_cfg = load_config(config, [*common, f"seed={seed}", "pipeline=kd"])
    return {
        ALONE: measured(client, full, "student_alone", ["student_alone"]),
        KD: measured(client, kd, "distill", ["distill"]),
        EBKD: measured(client, ebkd, "distill", ["distill"]),
        TS: temperature_scaled(client, kd_cfg, kd["distill"], folder / f"ts-{seed}"),
        MODE: measured(client, mode, "mtbkd", ["mtbkd"]),
        ONE_CHAIN: measured(client, full, "mtbkd_chain_1", ["mtbkd_chain_1"]),
        TWO_CHAINS: measured(client, full, "mtbkd", ["mtbkd_chain_1", "mtbkd_chain_2", "mtbkd"]),
        ENSEMBLE: measured(client, full, "deep_ensemble", members),
    }


def cell(values: list[float], scale: float, form: str) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * scale:{form}} ± {spread:{form}}"


def table(rows: dict[str, list[Measured]], columns, prefix: str = "", cost: bool = False) -> str:
    header = ["row", *(c[0] for c in columns), *(["cost (s)"] if cost else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, results in rows.items():
        cells = [cell([r.metrics[f"{prefix}{key}"] for r in results if f"{prefix}{key}" in r.metrics], scale, form)
                 for _, key, scale, form in columns]
        if cost:
            cells.append(cell([r.cost_s for r in results], 1, ".0f"))
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def mean(rows: dict[str, list[Measured]], label: str, key: str) -> float:
    return statistics.mean(r.metrics[key] for r in rows[label])


def goals(rows: dict[str, list[Measured]]) -> list[str]:
    """Issue 13's goals for each MT-BKD row with sampling, each with the measured number and whether it holds."""
    out = []
    for key in ("nll", "ece"):
        ranked = sorted(SINGLE_STUDENT, key=lambda label: mean(rows, label, key))
        out.append(f"lowest {key.upper()} of the single-student rows: {ranked[0]} ({mean(rows, ranked[0], key):.4f}); "
                   + "; ".join(f"{label} ranks {ranked.index(label) + 1} of {len(ranked)} "
                               f"({mean(rows, label, key):.4f})" for label in SAMPLED)
                   + f" -> {'met' if ranked[0] in SAMPLED else 'not met'}")
    for label in SAMPLED:
        diffs = [(m.metrics["acc"] - k.metrics["acc"]) * 100 for m, k in zip(rows[label], rows[KD])]
        spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        out.append(f"accuracy of {label} minus plain KD: {statistics.mean(diffs):+.2f} ± {spread:.2f} points, paired "
                   f"by seed (goal: at most 0.3 below) -> {'met' if statistics.mean(diffs) >= -0.3 else 'not met'}")
    for label in SAMPLED:
        gap = mean(rows, KD, "nll") - mean(rows, ENSEMBLE, "nll")
        ratio = statistics.mean(r.cost_s for r in rows[label]) / statistics.mean(r.cost_s for r in rows[ENSEMBLE])
        if gap <= 0:  # nothing to close: plain KD's NLL is already at or below the deep ensemble's
            out.append(f"{label}: no NLL gap to close, plain KD ({mean(rows, KD, 'nll'):.4f}) is already at or below "
                       f"the deep ensemble ({mean(rows, ENSEMBLE, 'nll'):.4f}); {label} has "
                       f"{mean(rows, label, 'nll'):.4f} at {ratio:.2f}x the ensemble's cost -> not applicable")
            continue
        closed = (mean(rows, KD, "nll") - mean(rows, label, "nll")) / gap
        out.append(f"{label}: closes {closed * 100:.0f} % of the NLL gap between plain KD and the deep ensemble "
                   f"(goal: >= 50 %) at {ratio:.2f}x its cost (goal: < 0.5) -> "
                   f"{'met' if closed >= 0.5 and ratio < 0.5 else 'not met'}")
    return out


def synthetic(seeds: list[int], common: list[str], uri: str) -> str:
    """Credible-interval coverage of the true class probabilities on the Gaussian mixture."""
    client = MlflowClient(uri)
    config = str(ROOT / "conf" / "mtbkd_synthetic.yaml")
    found: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        for variant, overrides in SYNTHETIC_VARIANTS.items():
            cfg = load_config(config, [f"seed={seed}", "mtbkd.deep_ensemble=4", *common, *overrides])
            runs = stages_of(client, run_experiment(cfg, tracking_uri=uri))
            picks = {f"MT-BKD + SGLD, {variant}, 1 chain": "mtbkd_chain_1",
                     f"MT-BKD + SGLD, {variant}, 2 chains pooled": "mtbkd"}
            if not overrides:
                picks |= {"deep ensemble of 4 students alone": "deep_ensemble", "student alone": "student_alone"}
            picks = {label: stage for label, stage in picks.items() if stage in runs}
            for label, stage in picks.items():
                found.setdefault(label, []).append(computed(client, runs[stage]).data.metrics)
    columns = (("95 % CI coverage", "test_ci_coverage", 1, ".3f"), ("CI width", "test_ci_width", 1, ".4f"),
               ("acc %", "test_acc", 100, ".2f"), ("NLL", "test_nll", 1, ".4f"), ("ECE", "test_ece", 1, ".4f"),
               ("R-hat (val LL)", "val_loglik_rhat", 1, ".2f"))
    rows = {label: [Measured(m, 0.0) for m in ms] for label, ms in found.items()}
    return table(rows, columns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "mtbkd.yaml"))
    ap.add_argument("--part", choices=("all", "main", "synthetic"), default="all",
                    help="main: the Fashion-MNIST table only; synthetic: the synthetic task only")
    ap.add_argument("--synthetic-seeds", type=int, nargs="+", help="default: the seeds of --seeds")
    ap.add_argument("--synthetic-set", dest="synthetic_overrides", action="append", default=[])
    ap.add_argument("--sequential", action="store_true", help="run one stage at a time")
    ap.add_argument("--out", default="mtbkd_benchmark", help="folder for downloaded checkpoints")
    add_seeded_run_args(ap, "one seed, a tiny subset, 2 epochs per model")
    args = ap.parse_args()
    uri = args.tracking_uri or default_tracking_uri()
    parallel = f"ray.parallel={str(not args.sequential).lower()}"
    common = [f"experiment={EXPERIMENT}", parallel,
              *(QUICK if args.quick else []), *args.overrides]
    seeds = seeds_of(args)
    if args.part in ("all", "main"):
        main_table(args, seeds, common, uri)
    if args.part in ("all", "synthetic"):
        synthetic_seeds = args.synthetic_seeds or seeds
        synthetic_common = [parallel, "experiment=mtbkd-benchmark-synthetic",
                            *(SYNTHETIC_QUICK if args.quick else []), *args.synthetic_overrides]
        print(f"\nsynthetic task (conf/mtbkd_synthetic.yaml, overrides {synthetic_common}), seeds {synthetic_seeds}\n")
        print(synthetic(synthetic_seeds, synthetic_common, uri))


def main_table(args: argparse.Namespace, seeds: list[int], common: list[str], uri: str) -> None:
    """Every row on ``args.config`` for every seed; after each seed, the tables (clean, each shift) and the goals
    over the seeds so far (a run stopped early still leaves its finished seeds' numbers)."""
    rows: dict[str, list[Measured]] = {}
    for done, seed in enumerate(seeds, 1):
        for label, result in run_seed(args.config, seed, common, uri, Path(args.out)).items():
            rows.setdefault(label, []).append(result)
        print_tables(rows, f"{Path(args.config).name} (overrides {common}), seeds {seeds[:done]}")


def print_tables(rows: dict[str, list[Measured]], title: str) -> None:
    print(f"\n{title}: mean ± std over seeds\n")
    print(table(rows, CLEAN, cost=True))
    for shift in ("noise", "blur"):
        print(f"\nunder shift `{shift}` (evaluation.shifts)\n")
        print(table(rows, SHIFTED, prefix=f"{shift}_"))
    print("\ngoals:\n" + "\n".join(f"- {g}" for g in goals(rows)))


if __name__ == "__main__":
    main()
