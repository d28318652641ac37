"""The default's shipped teachers, reproduced bit for bit by the project's own ``hpmkd run conf/teachers.yaml``.

``conf/default.yaml`` loads its teachers from checkpoints in ``conf/teachers/`` and verifies each file's sha256
(``teachers[].sha256``) before anything runs. This script trains them again with ``conf/teachers.yaml`` (pipeline
``teachers``, ``reuse: false`` so nothing comes from an earlier run), reads each teacher stage's selected weights
back from its MLflow run (``checkpoint/model.pt``) and compares their sha256 with the digests ``--against`` names.
It prints, per teacher, the digests, validation and test accuracy and the training time; the last line is
``reproduced=<n>/<m>``, and it exits 1 when a digest differs. ``--write`` copies the files to the checkpoint paths
of ``--against`` (how they were made) and prints the digests to put in it.

    python benchmarks/teachers.py [--config conf/teachers.yaml] [--against conf/default.yaml] [--write]
        [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml
from mlflow import MlflowClient

from hpmkd.checkpoint import MODEL_FILE, file_digest
from hpmkd.components.tracking import child_runs, default_tracking_uri
from hpmkd.config import load_config
from hpmkd.pipelines.runner import run_experiment

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "teachers.yaml"))
    ap.add_argument("--against", default=str(ROOT / "conf" / "default.yaml"))
    ap.add_argument("--write", action="store_true", help="copy the trained files to --against's checkpoint paths")
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args()
    cfg = load_config(args.config, ["reuse=false"])
    uri = args.tracking_uri or default_tracking_uri()
    summary = run_experiment(cfg, tracking_uri=uri)
    client = MlflowClient(uri)
    runs = child_runs(client, client.get_run(summary["parent_run_id"]).info.experiment_id, summary["parent_run_id"])
    shipped = {t["name"]: t for t in shipped_teachers(args.against)}
    reproduced = 0
    with tempfile.TemporaryDirectory() as folder:
        for teacher in cfg.teachers:
            run = runs[f"teacher_{teacher.name}"]
            path = client.download_artifacts(run.info.run_id, f"checkpoint/{MODEL_FILE}", folder + f"/{teacher.name}")
            digest = file_digest(path)
            target = shipped.get(teacher.name, {})
            expected = target.get("sha256")
            same = digest == expected
            reproduced += same
            metrics = run.data.metrics
            print(f"teacher {teacher.name} ({teacher.model} {teacher.options}): val {metrics['val_acc'] * 100:.2f} %, "
                  f"test {metrics['test_acc'] * 100:.2f} %, {(run.info.end_time - run.info.start_time) / 1000:.0f} s; "
                  f"sha256 {digest} {'==' if same else '!='} shipped {expected}")
            if args.write and target.get("checkpoint"):
                shutil.copyfile(path, ROOT / target["checkpoint"])
                print(f"  wrote {target['checkpoint']}; set its sha256: '{digest}'")
    print(f"reproduced={reproduced}/{len(cfg.teachers)}")
    return 0 if args.write or reproduced == len(cfg.teachers) else 1


def shipped_teachers(path: str) -> list[dict]:
    """The teachers of config ``path`` as written (name, checkpoint, sha256; not validated: with ``--write`` their
    files may not exist yet)."""
    return yaml.safe_load(Path(path).read_text())["teachers"]


if __name__ == "__main__":
    sys.exit(main())
