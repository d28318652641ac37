"""Does distillation beat the same student trained alone? The plain-KD experiment (conf/kd.yaml) over several seeds.

Runs ``conf/kd.yaml`` once per seed (teachers, student alone and distilled student all retrained per seed),
then builds the table from the MLflow records alone: per seed the teachers', the student-alone and the distilled
student's test accuracy (weights selected on validation, test read once), then mean ± std and the paired gain.
Last line: ``kd_gain=<mean gain in points>``.

    python benchmarks/kd_vs_alone.py [--config conf/kd.yaml] [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from mlflow import MlflowClient

from hpmkd.components.tracking import child_runs, default_tracking_uri
from hpmkd.config import load_config
from hpmkd.pipelines.runner import run_experiment

ROOT = Path(__file__).resolve().parent.parent


def add_seeded_run_args(ap, quick_help: str) -> None:
    """The options every seeded benchmark shares: ``--seeds``, ``--quick``, ``--tracking-uri``, ``--set``."""
    ap.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])


def seeds_of(args) -> list[int]:
    """The seeds a benchmark runs: ``--seeds``, else 0 1 2 (0 with ``--quick``)."""
    return args.seeds or ([0] if args.quick else [0, 1, 2])


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * 100:.2f} ± {spread * 100:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "kd.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="the smoke config (tiny subset), for a check in minutes")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    config = str(ROOT / "conf" / "smoke.yaml") if args.quick else args.config
    uri = args.tracking_uri or default_tracking_uri()
    parents = []
    for seed in args.seeds:
        cfg = load_config(config, [*args.overrides, f"seed={seed}", "distill.baseline=true"])
        parents.append(run_experiment(cfg, tracking_uri=uri)["parent_run_id"])

    client = MlflowClient(uri)
    rows, gains, alone_accs, kd_accs = [], [], [], []
    for parent_id in parents:
        parent = client.get_run(parent_id)
        stages = {k: r.data.metrics for k, r in child_runs(client, parent.info.experiment_id, parent_id).items()}
        teachers = {k.removeprefix("teacher_"): v["test_acc"] for k, v in stages.items() if k.startswith("teacher_")}
        alone, kd = stages["student_alone"]["test_acc"], stages["distill"]["test_acc"]
        gains.append(kd - alone)
        alone_accs.append(alone)
        kd_accs.append(kd)
        rows.append((parent.data.params["seed"], teachers, alone, kd))
    names = sorted(rows[0][1])
    print(f"{'seed':>4}  " + "".join(f"{'teacher ' + n:>14}" for n in names) + f"{'alone':>9}{'KD':>9}{'gain':>8}")
    for seed, teachers, alone, kd in rows:
        print(f"{seed:>4}  " + "".join(f"{teachers[n] * 100:>14.2f}" for n in names)
              + f"{alone * 100:>9.2f}{kd * 100:>9.2f}{(kd - alone) * 100:>+8.2f}")
    print(f"mean ± std over {len(rows)} seeds: alone {mean_std(alone_accs)}, KD {mean_std(kd_accs)}, "
          f"gain {mean_std(gains)} points (KD better in {sum(g > 0 for g in gains)}/{len(gains)} seeds)")
    print(f"kd_gain={statistics.mean(gains) * 100:.3f}")


if __name__ == "__main__":
    main()
