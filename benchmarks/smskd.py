"""SMSKD with two and three stages against each of its methods alone and against plain KD, on Fashion-MNIST over
seeds.

Per seed, one teacher and one student (``conf/smskd.yaml``'s: ``cnn_small`` -> a 12x smaller ``cnn``). Each method
alone is the ``kd`` pipeline with that method's recipe (plain KD is the ``kd`` recipe alone); SMSKD runs the methods
in sequence (pipeline ``smskd``), each stage starting from the previous student, anchored to a frozen copy of it
(``smskd.reference``). A stage uses exactly the recipe and epochs of its method alone, so SMSKD's first stage *is*
that method alone (the same stage, reused from the MLflow memory) and a K-stage SMSKD trains K times as many epochs;
plain KD is therefore also run with 2 and 3 times the epochs, the budgets of the two SMSKD rows.
Weights are selected on validation and the test split is read once per final model. The table is built from the
MLflow records alone: test accuracy mean ± std over seeds, the paired difference to plain KD, and for SMSKD the
validation accuracy after each stage. Last lines: ``smskd_gain=<mean test accuracy of the two-stage SMSKD minus plain
KD, in points>`` and ``smskd_gain_same_epochs=`` (the same against plain KD trained as many epochs).

    python benchmarks/smskd.py [--seeds 0 1 2] [--quick] [--set key.path=value ...]

``--quick`` runs one seed on a tiny subset with 2 epochs per stage (a check that everything works, in minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mlflow import MlflowClient

from hpmkd.components.tracking import child_runs, default_tracking_uri
from hpmkd.config import load_config
from kd_vs_alone import add_seeded_run_args, mean_std, seeds_of
from hpmkd.pipelines.runner import run_experiment

ROOT = Path(__file__).resolve().parent.parent
#: method -> its recipe (the distill keys it sets): the same alone and as an SMSKD stage
RECIPES = {
    "kd": {"methods": {"kd": {"weight": 0.5}}, "ce_weight": 0.5},
    "fitnet": {"methods": {"fitnet": {"weight": 10}}, "ce_weight": 1.0},
    "at": {"methods": {"at": {"weight": 1000}}, "ce_weight": 1.0},
}
#: row name -> (the methods in order (one: the method alone, pipeline kd; several: SMSKD), epochs in stage budgets).
#: A K-stage SMSKD trains K stage budgets; plain KD is also run for 2 and 3 budgets, so every SMSKD row has a plain
#: KD row of equal training length.
ROWS = {
    "plain KD": (["kd"], 1),
    "plain KD, 2x epochs": (["kd"], 2),
    "plain KD, 3x epochs": (["kd"], 3),
    "FitNet alone": (["fitnet"], 1),
    "AT alone": (["at"], 1),
    "SMSKD fitnet > kd": (["fitnet", "kd"], 2),
    "SMSKD at > fitnet > kd": (["at", "fitnet", "kd"], 3),
}
TWO_STAGE = "SMSKD fitnet > kd"
QUICK = ["data.max_train=1500", "data.max_val=300", "data.max_test=1000", "train.epochs=2",
         "teachers.0.train={epochs: 3}"]


def overrides(methods: list[str], budgets: int, stage_epochs: int) -> list[str]:
    """Config overrides for a row: a method alone replaces the distill keys (and trains ``budgets`` stages' epochs);
    SMSKD lists its stages."""
    if len(methods) == 1:
        recipe = {**RECIPES[methods[0]], **({"train": {"epochs": budgets * stage_epochs}} if budgets > 1 else {})}
        return ["pipeline=kd"] + [f"distill.{k}={json.dumps(v)}" for k, v in recipe.items()]
    return ["pipeline=smskd", f"smskd.stages={json.dumps([RECIPES[m] for m in methods])}"]


def final_and_curve(client: MlflowClient, parent_id: str) -> tuple[float, list[float]]:
    """The final student's test accuracy, and the validation accuracy after each distillation stage."""
    parent = client.get_run(parent_id)
    runs = child_runs(client, parent.info.experiment_id, parent_id)
    stages = sorted((r for r in runs.values() if r.data.tags["stage_kind"] == "distill"),
                    key=lambda r: r.data.tags["stage"])
    return stages[-1].data.metrics["test_acc"], [r.data.metrics["selected_val_acc"] for r in stages]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "smskd.yaml"))
    add_seeded_run_args(ap, "one seed, a tiny subset, 2 epochs per stage")
    args = ap.parse_args()
    seeds = seeds_of(args)
    uri = args.tracking_uri or default_tracking_uri()
    common = [*(QUICK if args.quick else []), *args.overrides, "experiment=smskd-benchmark", "distill.baseline=false"]
    parents: dict[str, list[str]] = {}
    stage_epochs = load_config(args.config, common).recipe().train.epochs
    for seed in seeds:
        for row, (methods, budgets) in ROWS.items():
            cfg = load_config(args.config, [*common, f"seed={seed}", *overrides(methods, budgets, stage_epochs)])
            parents.setdefault(row, []).append(run_experiment(cfg, tracking_uri=uri)["parent_run_id"])

    client = MlflowClient(uri)
    results = {row: [final_and_curve(client, p) for p in ids] for row, ids in parents.items()}
    kd = [test for test, _ in results["plain KD"]]
    equal = {budgets: row for row, (methods, budgets) in ROWS.items() if methods == ["kd"]}  # plain KD per budget
    print(f"{'row':<26}{'stages':>7}{'test acc':>16}{'vs plain KD':>20}{'vs plain KD, same epochs':>26}"
          f"   val acc after each stage")
    gains = {}
    for row, outcomes in results.items():
        tests = [test for test, _ in outcomes]
        gains[row] = [t - k for t, k in zip(tests, kd)]
        curve = " > ".join(mean_std([c[i] for _, c in outcomes]) for i in range(len(outcomes[0][1])))
        better = sum(g > 0 for g in gains[row])
        vs_kd = "-" if row == "plain KD" else f"{mean_std(gains[row])} ({better}/{len(seeds)})"
        same = [test for test, _ in results[equal[ROWS[row][1]]]]
        paired = [t - k for t, k in zip(tests, same)]
        vs_same = "-" if row in equal.values() else f"{mean_std(paired)} ({sum(g > 0 for g in paired)}/{len(seeds)})"
        print(f"{row:<26}{len(ROWS[row][0]):>7}{mean_std(tests):>16}{vs_kd:>20}{vs_same:>26}   {curve}")
    print("accuracy in %, mean ± std over seeds; weights selected on validation; vs plain KD in points (seeds better)")
    print(f"smskd_gain={statistics.mean(gains[TWO_STAGE]) * 100:.3f}")
    same = [test for test, _ in results[equal[ROWS[TWO_STAGE][1]]]]
    print(f"smskd_gain_same_epochs={statistics.mean(t - k for (t, _), k in zip(results[TWO_STAGE], same)) * 100:.3f}")


if __name__ == "__main__":
    main()
