"""Every KD method, aggregator and temperature schedule on the same teachers and student, side by side.

1. Runs the base config once (teachers, the student alone, and plain KD), or takes them from ``--base-run``.
2. Re-runs only the distillation stage for each recipe below, with the base run's teachers loaded from their
   checkpoints (so every recipe sees identical teachers), and the student alone skipped.
3. Prints the table from the MLflow records: test accuracy (weights selected on validation), validation accuracy
   and wall time of each recipe, next to plain KD and the student alone. Last line: ``best_recipe=<name>``.

    python benchmarks/methods.py [--config conf/kd.yaml] [--seed 0] [--only kd dkd ...] [--quick]

Recipes that need convolutional feature maps (``at``, ``hierarchical``) distil from the teachers that have them
(the MLP teacher is left out, and the row says so), and are skipped for an MLP student. A recipe that fails is
listed with its error; the others still run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlflow import MlflowClient

from hpmkd.components.tracking import child_runs, default_tracking_uri
from hpmkd.config import load_config
from hpmkd.pipelines.runner import ExperimentFailedError, run_experiment

ROOT = Path(__file__).resolve().parent.parent

#: recipe name -> config overrides (each replaces the whole distill.methods / aggregator / temperature entry)
RECIPES: dict[str, list[str]] = {
    "dkd": ["distill.ce_weight=1.0", "distill.methods={dkd: {weight: 1.0, warmup: 1}}"],
    "fitnet": ["distill.ce_weight=1.0", "distill.methods={fitnet: {weight: 100}}"],
    "at": ["distill.ce_weight=1.0", "distill.methods={at: {weight: 1000}}"],
    "rkd": ["distill.ce_weight=1.0", "distill.methods={rkd: {weight: 1.0}}"],
    "pkt": ["distill.ce_weight=1.0", "distill.methods={pkt: {weight: 30000}}"],
    # 512 negatives, not the default 4096: at 4096 one epoch took over 10 minutes on the 2-core CPU machine
    "crd": ["distill.ce_weight=1.0", "distill.methods={crd: {weight: 0.8, nce_k: 512}}"],
    "hierarchical": ["distill.ce_weight=1.0", "distill.methods={kd: {weight: 0.9}, hierarchical: {weight: 1.0}}"],
    "kd+mean_probs": ["distill.aggregator={name: mean_probs}"],
    "kd+mean_loss (AVER)": ["distill.aggregator={name: mean_loss}"],
    "kd+entropy (EBKD)": ["distill.aggregator={name: entropy}"],
    "kd+confidence (CA-MKD)": ["distill.aggregator={name: confidence}"],
    "kd+variance (HumP-KD)": ["distill.aggregator={name: variance}"],
    "kd+attention (HPM-KD)": ["distill.aggregator={name: attention}"],
    "kd+cosine T": ["distill.temperature={schedule: cosine, T_min: 2, T_max: 6}"],
    "kd+meta T": ["distill.temperature={schedule: meta, T: 4, T_min: 2, T_max: 6}"],
}
NEEDS_MAPS = {"at", "hierarchical"}
#: model families without spatial feature maps: the map-based recipes use only the other teachers
FLAT_MODELS = {"mlp"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "kd.yaml"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="run only these recipes")
    ap.add_argument("--quick", action="store_true", help="the smoke config (tiny subset), for a check in minutes")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--base-run", help="parent run id of a finished run of the same config (with the student alone) "
                    "to take the teachers, student-alone and KD results from, instead of running it again")
    args = ap.parse_args()
    config = str(ROOT / "conf" / "smoke.yaml") if args.quick else args.config
    uri = args.tracking_uri or default_tracking_uri()
    base_overrides = [*args.overrides, f"seed={args.seed}"]
    base_cfg = load_config(config, [*base_overrides, "distill.baseline=true"])
    base_id = args.base_run or run_experiment(base_cfg, tracking_uri=uri)["parent_run_id"]

    client = MlflowClient(uri)
    experiment_id = client.get_run(base_id).info.experiment_id
    runs = child_runs(client, experiment_id, base_id)
    ckpt_dir = Path(base_cfg.output_dir).resolve() / "methods_teachers" / base_id  # fixed: reruns reuse recipes
    loaded = [
        {"name": t.name, "model": t.model, "options": t.options, "train": t.train,
         "checkpoint": client.download_artifacts(runs[f"teacher_{t.name}"].info.run_id, "checkpoint/model.pt",
                                                 str(ckpt_dir / t.name))}
        for t in base_cfg.teachers
    ]
    with_maps = [t for t in loaded if t["model"] not in FLAT_MODELS]

    student_is_mlp = base_cfg.student.model == "mlp"
    kd_label = f"base recipe ({', '.join(base_cfg.distill.methods)}, {base_cfg.distill.aggregator_choice().name})"
    results = {"student alone": runs["student_alone"], kd_label: runs["distill"]}
    skipped = {}
    for name in args.only or RECIPES:
        teachers, label = loaded, name
        if name in NEEDS_MAPS:
            if student_is_mlp or not with_maps:
                skipped[name] = "needs convolutional feature maps in the student and a teacher; there are none"
                continue
            teachers = with_maps
            if len(with_maps) < len(loaded):
                label = f"{name} (teachers: {', '.join(t['name'] for t in with_maps)})"
        cfg = load_config(config, [*base_overrides, f"teachers={json.dumps(teachers)}", *RECIPES[name],
                                   "distill.baseline=false", "mlflow.log_models=false"])
        try:
            summary = run_experiment(cfg, tracking_uri=uri)
        except ExperimentFailedError as err:
            skipped[label] = f"failed: {err}"
            continue
        client.set_tag(summary["parent_run_id"], "recipe", label)
        results[label] = child_runs(client, experiment_id, summary["parent_run_id"])["distill"]

    print(f"{'recipe':<26}{'test_acc':>9}{'val_acc':>9}{'wall_s':>8}  run")
    for name, run in results.items():
        m = run.data.metrics
        wall = (run.info.end_time - run.info.start_time) / 1000
        print(f"{name:<26}{m['test_acc'] * 100:>9.2f}{m['selected_val_acc'] * 100:>9.2f}{wall:>8.0f}  {run.info.run_id}")
    for name, why in skipped.items():
        print(f"{name:<26}{'n/a':>9}{'n/a':>9}{'':>8}  {why}")
    best = max((n for n in results if n != "student alone"), key=lambda n: results[n].data.metrics["selected_val_acc"])
    print(f"best_recipe={best}")


if __name__ == "__main__":
    main()
