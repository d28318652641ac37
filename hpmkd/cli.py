"""The ``hpmkd`` command.

::

    hpmkd run CONFIG [--set key.path=value ...] [--output results.json] [--tracking-uri URI]
    hpmkd validate CONFIG [--set ...]
    hpmkd ui [--tracking-uri URI] [--port N] [--host 127.0.0.1]
    hpmkd models

Ray and MLflow are imported only by the commands that need them, so ``validate`` answers in about a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from hpmkd.registry import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpmkd", description="Multi-teacher, multi-stage knowledge distillation on Ray + MLflow.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment")
    run.add_argument("config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a config key (repeatable), e.g. --set distill.temperature.T=2")
    run.add_argument("--output", help="write the results as JSON to this file")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)")

    val = sub.add_parser("validate", help="check a config without running anything")
    val.add_argument("config")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    ui = sub.add_parser("ui", help="open the MLflow UI on the experiment records")
    ui.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")

    sub.add_parser("models", help="list the model names create_model knows")
    return p


def cmd_validate(args: argparse.Namespace) -> int:
    from hpmkd.config import load_config
    from pipelines import PIPELINES

    cfg = load_config(args.config, args.overrides)
    stages = PIPELINES.get(cfg.pipeline, "pipeline")(cfg)
    teachers = ", ".join(f"{t.name}={t.model}" for t in cfg.teachers)
    print(f"OK {args.config}: experiment {cfg.experiment!r}, pipeline {cfg.pipeline}, data {cfg.data.name}, "
          f"teachers [{teachers}], student {cfg.student.model}, {len(stages)} stages ({', '.join(s.name for s in stages)})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from hpmkd.config import load_config

    cfg = load_config(args.config, args.overrides)  # fails before Ray starts
    from pipelines.runner import ExperimentFailedError, run_experiment
    from pipelines.summary import format_table

    try:
        summary = run_experiment(cfg, tracking_uri=args.tracking_uri, output=args.output)
    except ExperimentFailedError as err:
        print(format_table(err.summary))
        print(f"\nFAILED: {err}\nFinished stages are kept in MLflow ({err.summary['tracking_uri']}); rerun to retry.",
              file=sys.stderr)
        return 1
    print(format_table(summary))
    uri = summary["tracking_uri"]
    print(f"\nMLflow: parent run {summary['parent_run_id']} in {uri}")
    if is_server(uri):
        print(f"Browse the runs: open {uri} in a browser")
    else:
        print(f"Browse the runs: hpmkd ui --tracking-uri {uri}   (then open http://127.0.0.1:5000)")
    if args.output:
        print(f"Results JSON: {args.output}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from components.tracking import default_artifact_root, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    if is_server(uri):
        print(f"{uri} is a tracking server: its UI is at that address already (open it in a browser).")
        return 0
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--workers", "1"]
    root = default_artifact_root(uri)
    if root:
        command += ["--default-artifact-root", root]
    print(f"MLflow UI on http://{args.host}:{args.port} for {uri} (Ctrl-C to stop)", flush=True)
    os.execv(sys.executable, command)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from hpmkd.models import MODELS, list_models

    ours = MODELS.names()
    print("hpmkd models:", ", ".join(ours))
    print("torchvision models:", ", ".join(n for n in list_models() if n not in ours))
    return 0


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "ui": cmd_ui, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[hpmkd %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"hpmkd {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
