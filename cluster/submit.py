#!/usr/bin/env python
"""Submit ``hpmkd run CONFIG ...`` to a Ray cluster as a Ray Job.

::

    python cluster/submit.py CONFIG [--set KEY=VALUE ...] [--tracking-uri URI] [--address URL]
                             [--env KEY=VALUE ...] [--output FILE] [--validate-only] [--follow] [--dry-run]

What is submitted (``--dry-run`` prints exactly this, as JSON, without contacting a cluster):

* ``entrypoint``: ``python -m hpmkd.cli run CONFIG --tracking-uri URI [--set ...]``. ``python -m`` runs the hpmkd
  code uploaded with the job (this checkout), not whatever version happens to be installed on the nodes; the
  nodes only need the dependencies (``pip install -e .`` or the image built from ``cluster/Dockerfile``).
* ``runtime_env.working_dir``: this repository. Ray uploads it (skipping ``.git``, ``.venv`` and what
  ``.gitignore`` lists, plus the local run outputs in :data:`EXCLUDES`) and every Ray process of the job imports
  ``hpmkd`` (with ``hpmkd.components`` and ``hpmkd.pipelines``, mapped onto the upload's ``components/`` and
  ``pipelines/`` by :class:`hpmkd.CheckoutFolders`) from it.
* ``runtime_env.env_vars``: ``MLFLOW_TRACKING_URI``, any ``--env KEY=VALUE``, and ``RAY_OVERRIDE_JOB_RUNTIME_ENV=1``.
  ``hpmkd run`` joins the job's cluster without a runtime env of its own; the override keeps a driver script that
  wraps hpmkd and passes one to ``ray.init`` from being refused, since Ray will not merge a job's runtime env with a
  driver's that sets the same variable ("Failed to merge the Job's runtime env ... because of a conflict"; Ray
  2.60).

Where the cluster is: ``--address`` (the Ray dashboard / job server, ``http://HEAD:8265``), else
``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``. Token authentication is the client's business: with
``RAY_AUTH_MODE=token`` the token is read from ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token`` and sent as a header. It is never put into the job's runtime env: the dashboard shows runtime
envs in clear text, and the cluster's own nodes already hold the token.

Only the standard library is imported at module level; ``ray`` is imported when a job is really submitted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Local run outputs that must not travel with the job (on top of Ray's defaults and ``.gitignore``).
EXCLUDES = [".venv", "mlflow.db", "mlartifacts", "mlruns", "ray_results", "hpmkd_runs", "**/__pycache__"]

#: How long to retry while a just-started cluster's job server has no agent yet (seconds).
AGENT_WAIT_S = 60.0

#: Tracking-URI schemes that only work on the machine that holds the file.
LOCAL_TRACKING_SCHEMES = ("sqlite:", "file:")

#: See the module docstring: lets a driver's own ``ray.init(runtime_env=...)`` join the job's runtime env.
OVERRIDE_ENV = {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}


class UsageError(ValueError):
    """Bad command-line input; the message names the problem and the fix."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cluster/submit.py",
        description="Submit `hpmkd run CONFIG` to a Ray cluster as a Ray Job (see cluster/README.md).",
    )
    p.add_argument("config", help="experiment YAML inside this repository, e.g. conf/default.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="passed to hpmkd as --set (repeatable), e.g. --set ray.storage_path=s3://bucket/hpmkd")
    p.add_argument("--tracking-uri", help="MLflow tracking server as the cluster sees it, e.g. http://mlflow:5000 "
                   "(default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--address", help="Ray job server, e.g. http://127.0.0.1:8265 "
                   "(default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)")
    p.add_argument("--env", dest="env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for every process of the job (repeatable)")
    p.add_argument("--output", help="passed to hpmkd run --output (a path on the node that runs the driver)")
    p.add_argument("--validate-only", action="store_true",
                   help="submit `hpmkd validate` instead of `hpmkd run`: checks the config, model names and data "
                        "files where the driver runs, in seconds, without training")
    p.add_argument("--follow", action="store_true",
                   help="stream the job's logs until it ends; exit 0 only if it succeeded")
    p.add_argument("--dry-run", action="store_true", help="print the submission as JSON and exit; contacts nothing")
    return p


def config_in_repo(config: str) -> str:
    """``config`` as a POSIX path relative to the repository root (the job's working directory)."""
    path = Path(config).expanduser()
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if not path.is_file():
        raise UsageError(f"config file not found: {config} (looked at {path}).")
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        raise UsageError(
            f"config {path} is outside the repository {REPO_ROOT}; the job only sees the repository (it is uploaded "
            f"as the job's working directory). Copy the file under {REPO_ROOT / 'conf'} and submit that."
        ) from None


def tracking_uri(given: str | None, required: bool) -> str | None:
    """The MLflow tracking URI for the cluster: shared by every node, so never a local SQLite file or folder."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if required:
            raise UsageError(
                "no MLflow tracking URI: a cluster job records into a tracking server every node can reach. Pass "
                "--tracking-uri http://mlflow:5000 (start one with cluster/mlflow-server.sh or "
                "cluster/kuberay/mlflow.yaml) or set MLFLOW_TRACKING_URI."
            )
        return None
    if uri.startswith(LOCAL_TRACKING_SCHEMES) or "://" not in uri:
        raise UsageError(
            f"tracking URI {uri!r} names a local file: Ray workers on other nodes cannot write to it. Use a tracking "
            "server (--tracking-uri http://HOST:5000) or a database URI (postgresql://...)."
        )
    return uri


def env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {pair!r}: expected KEY=VALUE, e.g. --env HPMKD_DATA=/data.")
        env[key] = value
    return env


def cluster_address(given: str | None) -> str | None:
    return given or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")


def entrypoint(args: argparse.Namespace, config: str, uri: str | None) -> str:
    """The shell command the job runs on the cluster (quoted for the shell Ray runs it with)."""
    words = ["python", "-m", "hpmkd.cli", "validate" if args.validate_only else "run", config]
    if not args.validate_only:
        words += ["--tracking-uri", uri]
        if args.output:
            words += ["--output", args.output]
    for override in args.overrides:
        words += ["--set", override]
    return shlex.join(words)


def runtime_env(uri: str | None, extra_env: dict[str, str]) -> dict[str, Any]:
    env_vars = {**extra_env, **({"MLFLOW_TRACKING_URI": uri} if uri else {}), **OVERRIDE_ENV}
    return {"working_dir": str(REPO_ROOT), "excludes": list(EXCLUDES), "env_vars": env_vars}


def auth_description() -> str:
    """Where the client will take its Ray token from (never the token itself)."""
    if os.environ.get("RAY_AUTH_MODE", "disabled") != "token":
        return "none (set RAY_AUTH_MODE=token for a cluster with token authentication)"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "token from $RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"token from $RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return "token from ~/.ray/auth_token"


def storage_path_note(config: str, overrides: list[str]) -> str | None:
    """A reminder when neither the config nor ``--set`` names ``ray.storage_path`` (multi-node Train needs it)."""
    if any(o.split("=", 1)[0].strip() == "ray.storage_path" for o in overrides):
        return None
    import yaml  # a Ray dependency; imported here to keep module import light

    try:
        data = yaml.safe_load((REPO_ROOT / config).read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{config} is not valid YAML: {err}") from None
    ray_section = data.get("ray") if isinstance(data, dict) else None
    if isinstance(ray_section, dict) and ray_section.get("storage_path"):
        return None
    return ("note: ray.storage_path is not set, so Ray Train checkpoints go to a folder on the driver's disk, which "
            "Train workers on other nodes cannot reach: fine on one node only. On a multi-node cluster add "
            "--set ray.storage_path=s3://BUCKET/hpmkd (or gs://..., or an NFS path mounted on every node).")


def submission(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that would be sent, checked; raises :class:`UsageError` on bad input."""
    config = config_in_repo(args.config)
    uri = tracking_uri(args.tracking_uri, required=not args.validate_only)
    return {
        "address": cluster_address(args.address),
        "entrypoint": entrypoint(args, config, uri),
        "runtime_env": runtime_env(uri, env_pairs(args.env)),
        "metadata": {"hpmkd_config": config, "hpmkd_command": "validate" if args.validate_only else "run"},
        "auth": auth_description(),
        "tracking_uri": uri,
        "note": None if args.validate_only else storage_path_note(config, args.overrides),
    }


def follow(client: Any, job_id: str) -> str:
    """Print the job's logs as they come; return its final status."""
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return str(client.get_job_status(job_id))


def submit_when_ready(client: Any, sub: dict[str, Any]) -> str:
    """``client.submit_job``, retried while a just-started cluster's job agent is not registered yet.

    Right after ``ray up`` / ``kubectl apply`` the job server answers "No available agent to submit job, please
    try again later" for a few seconds; anything else fails at once.
    """
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=sub["entrypoint"], runtime_env=sub["runtime_env"],
                                     metadata=sub["metadata"])
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def submit(sub: dict[str, Any], wait: bool) -> int:
    """Submit to the cluster; with ``wait``, stream logs and return 0 only if the job succeeded."""
    address = sub["address"]
    if not address:
        raise UsageError("no Ray cluster address: pass --address http://HEAD:8265 (the Ray dashboard; through "
                         "`ray dashboard CLUSTER.yaml` or `kubectl port-forward` it is http://127.0.0.1:8265) or "
                         "set RAY_API_SERVER_ADDRESS.")
    # JobSubmissionClient lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override its address argument; export the
    # address we chose so an explicit --address wins over a stale environment.
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        job_id = submit_when_ready(client, sub)
    except Exception as err:  # connection refused, 401/403 from token auth, version mismatch: all reported alike
        print(f"submit: could not submit to {address}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"Submitted Ray job {job_id} to {address}")
    print(f"  dashboard: {address.rstrip('/')}/#/jobs/{job_id}")
    print(f"  logs:      ray job logs {job_id} --address {address} --follow")
    print(f"  stop:      ray job stop {job_id} --address {address}")
    if sub["tracking_uri"]:
        print(f"MLflow UI: {sub['tracking_uri']} (only reachable inside the cluster? tunnel or port-forward it to "
              "your machine first: cluster/README.md, 'Browsing results')")
    if not wait:
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nStopped following; the job keeps running (ray job stop {job_id} --address {address}).",
              file=sys.stderr)
        return 130
    print(f"Job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        sub = submission(args)
        if sub["note"]:
            print(sub["note"], file=sys.stderr)
        if args.dry_run:
            print(json.dumps({k: v for k, v in sub.items() if k != "note"}, indent=2))
            return 0
        return submit(sub, wait=args.follow)
    except UsageError as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
