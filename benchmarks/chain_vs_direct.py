"""Progressive chain against direct KD, at about 10x and about 50x compression, on Fashion-MNIST over seeds.

Per seed, one teacher (``conf/takd.yaml``'s ``cnn_small``, 103,466 parameters) is trained once and shared by every
run of that seed (the same teacher stage, reused from the MLflow memory). For each compression the same student is
distilled directly (pipeline ``kd``) and through the chain of assistants planned with ``chain.max_gap`` (pipeline
``takd``): same recipe, same epochs per step; every model's weights are selected on validation and the test split
is read once. The table is built from the MLflow records alone: per compression, the test accuracy of direct KD and
of the chain (mean ± std over seeds) and their paired difference. Last line: ``chain_gain_50x=<mean chain − direct
test accuracy at about 50x, in points>``.

    python benchmarks/chain_vs_direct.py [--seeds 0 1 2] [--max-gap 4] [--quick] [--set key.path=value ...]

``--quick`` runs one seed on a tiny subset with 2 epochs per step (a check that everything works, in minutes).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from mlflow import MlflowClient

from hpmkd.components.tracking import child_runs, default_tracking_uri
from hpmkd.config import load_config
from kd_vs_alone import add_seeded_run_args, mean_std, seeds_of
from hpmkd.pipelines.runner import run_experiment

ROOT = Path(__file__).resolve().parent.parent
#: compression label -> the student's options (a ``cnn`` with a stride-2 stem, like the teacher)
STUDENTS = {"~10x": {"width": 10, "stem_stride": 2}, "~50x": {"width": 4, "stem_stride": 2}}
QUICK = ["data.max_train=1500", "data.max_val=300", "data.max_test=1000", "train.epochs=2",
         "teachers.0.train={epochs: 3}"]


def distilled(client: MlflowClient, parent_id: str) -> dict:
    """The final student's test / validation accuracy and parameters, and the chain's steps (1 for direct KD)."""
    parent = client.get_run(parent_id)
    runs = child_runs(client, parent.info.experiment_id, parent_id)
    student = runs["distill"].data.metrics
    steps = runs["chain_plan"].data.metrics["steps"] if "chain_plan" in runs else 1
    teacher = runs["teacher_cnn"].data.metrics["test_acc"]
    return {"test": student["test_acc"], "val": student["selected_val_acc"], "params": student["params"],
            "steps": int(steps), "teacher": teacher}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "takd.yaml"))
    ap.add_argument("--max-gap", type=float, default=4.0, help="chain.max_gap of the planned chains")
    add_seeded_run_args(ap, "one seed, a tiny subset, 2 epochs per step")
    args = ap.parse_args()
    seeds = seeds_of(args)
    uri = args.tracking_uri or default_tracking_uri()
    common = [*(QUICK if args.quick else []), *args.overrides, "experiment=chain-vs-direct", "distill.baseline=false",
              f"chain.max_gap={args.max_gap}"]
    parents: dict[tuple[str, str], list[str]] = {}
    for seed in seeds:
        for label, options in STUDENTS.items():
            student = f"student.options={{width: {options['width']}, stem_stride: {options['stem_stride']}}}"
            for pipeline in ("kd", "takd"):
                cfg = load_config(args.config, [*common, f"seed={seed}", student, f"pipeline={pipeline}"])
                parents.setdefault((label, pipeline), []).append(run_experiment(cfg, tracking_uri=uri)["parent_run_id"])

    client = MlflowClient(uri)
    results = {key: [distilled(client, p) for p in ids] for key, ids in parents.items()}
    teacher = [r["teacher"] for r in results[(next(iter(STUDENTS)), "kd")]]
    print(f"teacher cnn_small test accuracy over {len(seeds)} seed(s): {mean_std(teacher)}")
    print(f"{'compression':<13}{'student params':>15}{'steps':>7}{'direct KD test':>18}{'chain test':>18}"
          f"{'chain val':>15}{'chain - direct':>20}")
    gains = {}
    for label in STUDENTS:
        direct, chain = results[(label, "kd")], results[(label, "takd")]
        gains[label] = [c["test"] - d["test"] for c, d in zip(chain, direct)]
        better = sum(g > 0 for g in gains[label])
        print(f"{label:<13}{int(direct[0]['params']):>15,}{chain[0]['steps']:>7}"
              f"{mean_std([d['test'] for d in direct]):>18}{mean_std([c['test'] for c in chain]):>18}"
              f"{mean_std([c['val'] for c in chain]):>15}"
              f"{mean_std(gains[label]):>14} ({better}/{len(seeds)})")
    print("test accuracy in %, mean ± std over seeds; weights selected on validation; chain - direct in points "
          "(seeds where the chain is better)")
    print(f"chain_gain_50x={statistics.mean(gains['~50x']) * 100:.3f}")


if __name__ == "__main__":
    main()
