"""The ``hpmkd`` command.

::

    hpmkd run CONFIG [--set key.path=value ...] [--output results.json] [--tracking-uri URI] [--quiet] [--verbose]
    hpmkd validate CONFIG [--set ...]
    hpmkd ui [--tracking-uri URI] [--port N] [--host 127.0.0.1]
    hpmkd models
    hpmkd cache list|clear [--dir DIR] [--older-than 7d]
    hpmkd report [--tracking-uri URI] [--experiment NAME ...] [--out DIR] [--log]
    hpmkd ablate CONFIG --seeds N [--components NAME ...] [--output DIR] [--tracking-uri URI] [--set ...]
    hpmkd cluster up|down|status [--root DIR] [--nodes N] [--cpus C] [--head-cpus C] [--port N] ...

Ray and MLflow are imported only by the commands that need them: ``validate`` checks the config, its data, models
and objectives (:mod:`hpmkd.pipelines.preflight`) without starting either.

Every failure the user can fix (a bad config, option, file, path, store or data set) ends the same way: one line
``hpmkd: error: <what, where, how to fix>`` on stderr and exit code 2, like argparse's own usage errors, with no
traceback; ``--debug`` (before or after the command) prints the traceback too. A stage that fails while running is
reported with the summary of what finished and exit code 1; Ctrl-C or SIGTERM ends with exit code 130.

``run`` shows every running stage live (epoch k/N, running loss, last validation accuracy, ETA; one row per stage,
:mod:`hpmkd.components.progress`); with ``--quiet``, or when the output is not a terminal, one line per epoch
instead. Ray's and MLflow's own messages go to ``<output_dir>/hpmkd.log`` unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import logging.handlers
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from hpmkd.registry import ConfigError

DEFAULT_CACHE_DIR = "hpmkd_runs/logit_cache"
DEFAULT_CLUSTER_ROOT = "hpmkd_cluster"


#: what a user-caused failure raises: config and option errors (``ConfigError`` is a ``ValueError``), malformed
#: files and values (``ValueError``), missing or unreadable files and folders, and stores or clusters that cannot be
#: reached (``OSError``: ``FileNotFoundError``, ``PermissionError``, ``ConnectionError``)
USER_ERRORS = (ConfigError, ValueError, OSError)


class Parser(argparse.ArgumentParser):
    """argparse with hpmkd's error line: usage problems end as ``hpmkd: error: ...`` and exit code 2 too."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"hpmkd: error: {message} (see `{self.prog} --help`)\n")


def port(text: str) -> int:
    """A TCP port number (argparse type)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def command(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand; every one also takes ``--debug`` (after the command name as well as before it)."""
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    return sub.add_parser(name, parents=[common], **kwargs)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="hpmkd", description="Multi-teacher, multi-stage knowledge distillation on Ray + MLflow.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    run = command(sub, "run", help="run an experiment")
    run.add_argument("config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a config key (repeatable), e.g. --set distill.temperature.T=2")
    run.add_argument("--output", help="write the results as JSON to this file")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)")
    run.add_argument("--quiet", action="store_true", help="one line per epoch instead of the live progress display")
    run.add_argument("--verbose", action="store_true",
                     help="show Ray's and MLflow's own messages (default: written to <output_dir>/hpmkd.log)")

    val = command(sub, "validate", help="check a config without running anything")
    val.add_argument("config")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    ui = command(sub, "ui", help="open the MLflow UI on the experiment records")
    ui.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db")
    ui.add_argument("--port", type=port, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")

    command(sub, "models", help="list the model names create_model knows")

    cache = command(sub, "cache", help="list or clear the teacher logit cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, text in (("list", "list the cache entries"), ("clear", "delete cache entries")):
        c = command(cache_sub, name, help=text)
        c.add_argument("--dir", default=DEFAULT_CACHE_DIR, help=f"cache folder (default {DEFAULT_CACHE_DIR}, "
                       "the default of the config key cache_dir)")
        if name == "clear":
            c.add_argument("--older-than", metavar="AGE", help="only entries older than AGE: 30m, 12h, 7d (default: all)")

    report = command(sub, "report", help="write a Markdown report with PNG plots from the MLflow records")
    report.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db")
    report.add_argument("--experiment", dest="experiments", action="extend", nargs="+", metavar="NAME",
                        help="experiments to report (default: every experiment with pipeline runs)")
    report.add_argument("--out", default="report", help="folder for report.md and the figures (default: report)")
    report.add_argument("--log", action="store_true",
                        help="also log the report to MLflow (one run tagged kind=report per experiment)")

    ablate = command(sub, "ablate", help="run the full pipeline and each single-component removal over seeds, "
                            "then write the ablation table (docs/ablation.md)")
    ablate.add_argument("config")
    ablate.add_argument("--seeds", type=int, required=True, metavar="N", help="run seeds 0 .. N-1")
    ablate.add_argument("--components", nargs="+", metavar="NAME",
                        help="the components to remove, one at a time (default: all six: config_manager chain attention "
                        "meta_temperature parallel memory)")
    ablate.add_argument("--output", default="ablation",
                        help="folder for ablation.md, ablation.csv, ablation.json and the figures (default: ablation)")
    ablate.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db")
    ablate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config key of every variant (repeatable)")
    cluster = command(sub, "cluster", help="a local multi-node Ray cluster with an MLflow server (docs/scaling.md)")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    for name, text in (("up", "start the nodes and the MLflow server"), ("down", "stop everything `up` started"),
                       ("status", "which recorded processes live, and the environment a driver needs")):
        c = command(cluster_sub, name, help=text)
        c.add_argument("--root", default=DEFAULT_CLUSTER_ROOT,
                       help=f"the cluster's folder: its state, logs, token, MLflow store and shared storage "
                       f"(default {DEFAULT_CLUSTER_ROOT})")
        if name == "up":
            c.add_argument("--nodes", type=int, default=3, help="Ray nodes, the head included (default 3)")
            c.add_argument("--cpus", type=float, default=1.0, help="CPUs of each node (default 1)")
            c.add_argument("--head-cpus", type=float, help="CPUs of the head (default: --cpus)")
            c.add_argument("--port", type=port, help="the head's GCS port (default: a free one)")
            c.add_argument("--dashboard-port", type=port, help="dashboard and job server (default: a free one)")
            c.add_argument("--mlflow-port", type=port, help="the MLflow server (default: a free one)")
    return p


def cmd_validate(args: argparse.Namespace) -> int:
    from hpmkd.config import load_config
    from hpmkd.data import DatasetNotFoundError
    from hpmkd.pipelines import plan_experiment
    from hpmkd.pipelines.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    plan = plan_experiment(cfg)
    stages = plan.stages
    try:
        preflight(plan, download=False)
        checked = "data, models and objectives checked"
    except DatasetNotFoundError:
        if not cfg.data.download:
            raise
        checked = "data not present yet (hpmkd run downloads it), so models were checked by name only"
    teachers = ", ".join(f"{t.name}={t.model}" for t in cfg.teachers)
    names = ", ".join(s.name for s in stages)
    print(f"OK {args.config}: experiment {cfg.experiment!r}, pipeline {cfg.pipeline}, data {cfg.data.name}, "
          f"teachers [{teachers}], student {cfg.student.model}, {len(stages)} stages ({names}); {checked}")
    return 0


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_run(args: argparse.Namespace) -> int:
    from hpmkd.config import load_config

    cfg = load_config(args.config, args.overrides)  # fails before Ray starts
    from hpmkd.components.progress import LineDisplay, LiveDisplay, console_logging
    from hpmkd.pipelines.runner import ExperimentFailedError, run_experiment
    from hpmkd.pipelines.summary import format_table

    held = None if args.verbose else hold_library_messages()

    def library_messages_to_file() -> None:  # once the experiment has passed its checks: a refused run writes nothing
        path = library_messages_to(os.path.join(cfg.output_dir, "hpmkd.log"), held)
        logging.getLogger("hpmkd").info("Ray's and MLflow's messages: %s (--verbose shows them here)", path)

    display = LineDisplay() if args.quiet or not sys.stdout.isatty() else LiveDisplay()
    # SIGTERM (a scheduler cancelling the job, `kill`) ends the run like Ctrl-C: the open MLflow runs become KILLED
    signal.signal(signal.SIGTERM, interrupt)
    try:
        with console_logging(display):
            summary = run_experiment(cfg, tracking_uri=args.tracking_uri, output=args.output, display=display,
                                     checked=None if args.verbose else library_messages_to_file)
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


#: the loggers of the libraries whose start-up and progress messages ``run`` writes to its log file
LIBRARY_LOGGERS = ("ray", "mlflow", "alembic", "py.warnings")


def route_library_messages(*handlers: logging.Handler) -> None:
    """Send the :data:`LIBRARY_LOGGERS` (and Python warnings) to ``handlers`` only."""
    importlib.import_module("ray")  # configures its logger on import; replaced below
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = list(handlers)
        logger.propagate = False


#: MLflow's switch for the progress bars it prints to stderr while it moves artifacts
ARTIFACT_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def hold_library_messages() -> logging.handlers.MemoryHandler:
    """Keep the libraries' messages in memory while the run is checked (opening a new MLflow store announces its
    tables, for one): a run that passes writes them to its log file (:func:`library_messages_to`). Their warnings and
    errors also show on stderr as they come, so that a refused run, which writes no file, still shows them, above its
    ``hpmkd: error:`` line. MLflow's artifact progress bars (a reused stage's files read back), which bypass logging,
    are switched off unless the environment sets ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``."""
    os.environ.setdefault(ARTIFACT_PROGRESS_BAR, "false")
    shown = logging.StreamHandler(sys.stderr)
    shown.setLevel(logging.WARNING)
    held = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    route_library_messages(held, shown)
    return held


def library_messages_to(path: str, held: logging.handlers.MemoryHandler | None = None) -> str:
    """Send the :data:`LIBRARY_LOGGERS` (and Python warnings) to the file ``path`` instead of the terminal, after
    the messages ``held`` so far."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    if held is not None:
        held.setTarget(handler)
        held.close()  # flushes what it held into the file
    route_library_messages(handler)
    return os.path.abspath(path)


def cmd_ui(args: argparse.Namespace) -> int:
    from hpmkd.components.tracking import Tracker, default_artifact_root, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    if is_server(uri):
        print(f"{uri} is a tracking server: its UI is at that address already (open it in a browser).")
        return 0
    Tracker.check_store(uri)  # a bad URI fails here, not in the server process it would be handed to
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--workers", "1"]
    root = default_artifact_root(uri)
    if root:
        command += ["--default-artifact-root", root]
    print(f"MLflow UI on http://{args.host}:{args.port} for {uri} (Ctrl-C to stop)", flush=True)
    os.execv(sys.executable, command)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from hpmkd.logit_cache import clear, list_entries

    if not os.path.isdir(args.dir):
        raise ConfigError(f"--dir {args.dir}: no such folder (nothing has been cached there yet); give the folder of "
                          f"the config key cache_dir (default {DEFAULT_CACHE_DIR}, under the folder hpmkd ran in).")
    if args.cache_command == "list":
        entries = list(list_entries(args.dir))
        for e in entries:
            if e.key is None:
                print(f"{e.path.stem:<24}  DAMAGED  {e.size_bytes / 2**20:8.2f} MiB  {e.problem} (the next stage that "
                      f"needs it moves it aside and recomputes it)")
                continue
            print(f"{e.key.digest}  {e.rows:>8} rows  {e.size_bytes / 2**20:8.2f} MiB  {e.key.dtype:<8} "
                  f"top_k={e.key.top_k}  {e.key.model.split(':')[0]:<12} data={e.key.data} split={e.key.split} view={e.key.view}"
                  + (f" taps={','.join(e.key.taps)}" if e.key.taps else ""))
        damaged = sum(e.key is None for e in entries)
        print(f"{len(entries)} entries{f' ({damaged} damaged)' if damaged else ''}, "
              f"{sum(e.size_bytes for e in entries) / 2**20:.2f} MiB in {args.dir}")
        return 0
    removed = clear(args.dir, parse_age(args.older_than) if args.older_than else None)
    print(f"removed {len(removed)} files from {args.dir}")
    return 0


def parse_age(text: str) -> float:
    """``30m`` / ``12h`` / ``7d`` / ``90s`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not text[:-1].replace(".", "", 1).isdigit():
        raise ConfigError(f"--older-than {text!r}: expected a number and a unit, e.g. 30m, 12h or 7d.")
    return float(text[:-1]) * units[text[-1]]


def cmd_report(args: argparse.Namespace) -> int:
    from hpmkd.components.report import write_report
    from hpmkd.components.tracking import default_tracking_uri

    path = write_report(args.tracking_uri or default_tracking_uri(), args.out, args.experiments, log=args.log)
    print(f"Report: {path}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from hpmkd.components.report.ablation_files import ablation_markdown
    from hpmkd.pipelines.ablate import plan_ablation, run_ablation

    plan = plan_ablation(args.config, args.seeds, args.components, args.overrides)  # fails before Ray starts
    signal.signal(signal.SIGTERM, interrupt)  # as in `run`: the open MLflow runs become KILLED
    result = run_ablation(plan, args.output, tracking_uri=args.tracking_uri)
    print(ablation_markdown(result.table, {}))
    print(f"\nFiles: {', '.join(str(f) for f in result.files)}")
    print(f"MLflow: ablation run {result.run_id} (kind=ablation) in {result.tracking_uri}")
    for failed in result.failed:
        print(f"FAILED: {failed.variant} seed {failed.seed} (run {failed.run_id or '-'}): {failed.error}", file=sys.stderr)
    if result.failed:
        print(f"{len(result.failed)} run(s) failed; rerun the same command to retry them (finished runs are skipped).",
              file=sys.stderr)
    return 1 if result.failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    from hpmkd.models import MODELS
    from hpmkd.models.factory import timm_models, torchvision_models

    print("hpmkd models:", ", ".join(MODELS.names()))
    print("torchvision models:", ", ".join(sorted(torchvision_models())))
    timm = sorted(timm_models())
    print(f"timm models ({len(timm)}; options: timm's keyword arguments, e.g. img_size, patch_size, embed_dim, depth, "
          f"width_factor; pretrained: true or checkpoint: PATH):", ", ".join(timm))
    from hpmkd.estimators import ESTIMATORS

    print("estimator teachers (docs/tabular.md):", ", ".join(ESTIMATORS.names()))
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from hpmkd.components import local_cluster

    if args.cluster_command == "up":
        state = local_cluster.up(args.root, args.nodes, args.cpus, args.head_cpus, args.port, args.dashboard_port,
                                 args.mlflow_port)
        print(f"{len(state.nodes)} Ray nodes and MLflow up; state in {Path(state.root) / local_cluster.STATE_FILE}")
    elif args.cluster_command == "down":
        stopped = local_cluster.down(args.root)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    info = local_cluster.status(args.root)
    for proc in info["processes"]:
        print(f"{proc['name']:<12} pid {proc['pid']:<8} {'running' if proc['alive'] else 'STOPPED':<8} "
              f"cpus {proc['cpus']:g}  log {proc['log']}")
    print(f"dashboard {'up' if info['dashboard_up'] else 'DOWN'}, MLflow {'up' if info['mlflow_up'] else 'DOWN'}")
    print("use it from a shell:")
    print("  export " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    print("  hpmkd run CONFIG " + " ".join(f"--set {o}" for o in info["run_overrides"]))
    return 0 if all(p["alive"] for p in info["processes"]) else 1


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "ui": cmd_ui, "models": cmd_models, "cache": cmd_cache,
            "report": cmd_report, "ablate": cmd_ablate, "cluster": cmd_cluster}


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one the user can fix (:data:`USER_ERRORS`, or an MLflow store refusing a request)."""
    if isinstance(err, USER_ERRORS):
        return True
    if "mlflow" in sys.modules:  # only a command that imported MLflow can have raised its errors
        from mlflow.exceptions import MlflowException

        return isinstance(err, MlflowException)
    return False


def one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line messages joined), or its type when it has none."""
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[hpmkd %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.command](args)
    except Exception as err:
        if not is_user_error(err):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"hpmkd: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("hpmkd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
