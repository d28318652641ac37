"""A multi-node Ray cluster on one machine, for real: ``hpmkd cluster up|down|status``.

``up`` starts, under one folder (``--root``):

* a Ray head and ``nodes - 1`` worker nodes, each its own ``ray start --block`` process (its own raylet, object
  store and workers) with the CPUs asked for and a custom resource naming it (``hpmkd_node_<name>: 1``);
  everything listens on 127.0.0.1, each node's dashboard agent on a free port of its own (the head runs in Ray's
  single-machine mode, which keeps a loopback node address, see :mod:`hpmkd.components.ray_runtime`; the workers
  join it at 127.0.0.1), the dashboard and job server too;
* token authentication: a fresh random token in ``ROOT/auth_token`` (mode 600) that every node, driver and job
  client reads (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``);
* an MLflow tracking server (``mlflow server``) on 127.0.0.1 with a SQLite store and an artifacts folder under
  ``ROOT/mlflow``;
* Ray's session folders (logs, sockets) in a short folder under the system's temp folder (recorded, removed by
  ``down``; socket paths have a length limit), the other logs in ``ROOT/logs``;
* ``ROOT/shared``, the folder standing in for shared storage: Ray Train's ``storage_path`` (``shared/ray``) and the
  logit cache (``shared/cache``).

Every process it started is recorded in ``ROOT/cluster.json`` (its PID and process group). ``down`` stops those
process groups and every process below them (raylets and Ray workers included), and nothing else: other Ray
instances on the machine are left alone (``ray stop`` would kill them all). ``status`` says which recorded processes
live and prints the environment a driver needs (``RAY_ADDRESS`` ...), so ``hpmkd run`` and ``cluster/submit.py`` run
on it unchanged. :func:`kill_node` kills one node's processes, :func:`stop_mlflow` / :func:`start_mlflow` stop and
restart the tracking server (the fault tests).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpmkd.components.orphans import pid_exists
from hpmkd.components.placement import NODE_RESOURCE
from hpmkd.registry import ConfigError

STATE_FILE = "cluster.json"
READY_LINE = "Ray runtime started"
STARTUP_TIMEOUT_LINE = "timed out during startup"
STARTUP_ATTEMPTS = 3
START_TIMEOUT_S = 300.0  # a node or MLflow server starting on a busy machine


@dataclass
class Process:
    """One process ``up`` started: what it is, its PID (= its process group) and its log file."""

    name: str
    pid: int
    log: str
    cpus: float = 0.0
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)


@dataclass
class ClusterState:
    """What ``up`` wrote to ``ROOT/cluster.json``."""

    root: str
    ray_address: str
    dashboard_url: str
    tracking_uri: str
    token_path: str
    shared: str
    nodes: list[Process]
    mlflow: Process | None
    ray_temp: str = ""

    def env(self) -> dict[str, str]:
        """The environment a driver or job client needs to use this cluster."""
        return {"RAY_ADDRESS": self.ray_address, "RAY_API_SERVER_ADDRESS": self.dashboard_url,
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path,
                "MLFLOW_TRACKING_URI": self.tracking_uri}

    def run_overrides(self) -> list[str]:
        """The ``--set`` keys that put Ray Train's checkpoints and the logit cache on the shared folder."""
        return [f"ray.storage_path={Path(self.shared) / 'ray'}", f"cache_dir={Path(self.shared) / 'cache'}"]

    def processes(self) -> list[Process]:
        """Every recorded process: the nodes, then the MLflow server."""
        return [*self.nodes, *([self.mlflow] if self.mlflow else [])]

    def save(self) -> None:
        path = Path(self.root) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, root: str | os.PathLike) -> "ClusterState":
        path = Path(root).resolve() / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"cluster --root {root}: no {STATE_FILE} there; start a cluster with `hpmkd cluster up "
                              f"--root {root}` (or give the --root it was started with).")
        data = json.loads(path.read_text())
        nodes = [Process(**n) for n in data.pop("nodes")]
        mlflow = Process(**data.pop("mlflow")) if data.get("mlflow") else None
        data.pop("mlflow", None)
        return cls(nodes=nodes, mlflow=mlflow, **data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_executable() -> str:
    """The ``ray`` command of this Python environment (nodes must run this Ray version)."""
    return str(Path(sys.executable).with_name("ray"))


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    if not pid_exists(pid):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # ended meanwhile, or no /proc
        return pid_exists(pid)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children ...), from ``/proc``."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_process(proc: Process, sig: signal.Signals = signal.SIGTERM, grace_s: float = 10.0) -> None:
    """Stop a recorded process, its process group and every process below it; SIGKILL what outlives ``grace_s``."""
    pids = [proc.pid, *descendants(proc.pid)] if alive(proc.pid) else []
    for s in (sig, signal.SIGKILL):
        for pid in pids:
            with _gone():
                os.kill(pid, s)
        with _gone():
            os.killpg(proc.pid, s)
        deadline = time.monotonic() + (grace_s if s != signal.SIGKILL else 5.0)
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
        if not any(alive(p) for p in pids):
            return


class _gone:
    """Ignore a process that is already gone (or not ours to signal)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError))


def launch(name: str, argv: list[str], root: Path, env: dict[str, str], cpus: float = 0.0) -> Process:
    """Start ``argv`` in its own session (so it and its children form a process group), logging to ``logs/``."""
    log = root / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True, cwd=root)
    return Process(name, proc.pid, str(log), cpus, {k: v for k, v in env.items() if k.startswith("HPMKD_")}, argv)


def wait_for(what: str, ready, proc: Process, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if not alive(proc.pid):
            raise RuntimeError(f"{what} exited while starting; its log: {proc.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {timeout_s:.0f} s; its log: {proc.log}")
        time.sleep(0.3)


def node_ready(proc: Process) -> bool:
    return READY_LINE in Path(proc.log).read_text(errors="replace")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def node_base_env(token_path: str) -> dict[str, str]:
    """What every node's processes get: the token, and this environment's ``bin`` first on ``PATH`` (a Ray Job's
    ``python`` is then the Python that runs hpmkd and this Ray)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def node_names(count: int) -> list[str]:
    return ["head", *(f"node{i}" for i in range(1, count))]


def start_node(state: ClusterState, name: str, cpus: float, env: dict[str, str], base_env: dict[str, str]) -> Process:
    """Start one node (the head when ``state.nodes`` is empty), record it in ``state`` and wait until it has
    joined."""
    root = Path(state.root)
    # Each node has its own session folder, as on its own machine: a Ray Job's working_dir is unpacked under it,
    # and a folder shared by the nodes is replaced (then deleted) by one node's runtime-env agent under the feet of
    # the job's driver on the head (its working directory). Each node's dashboard agent gets its own free HTTP
    # port: Ray's fixed default (52365) is taken by the first node, or by any other Ray instance on the machine,
    # and the head's agent without it serves no Ray Jobs.
    temp = state.ray_temp if not state.nodes else os.path.join(state.ray_temp, name)
    args = [ray_executable(), "start", "--block", f"--num-cpus={cpus:g}", "--num-gpus=0",
            f"--resources={json.dumps({NODE_RESOURCE + name: 1})}", "--disable-usage-stats",
            f"--temp-dir={temp}", f"--dashboard-agent-listen-port={free_port()}"]
    node_env = {**base_env, **env}
    if not state.nodes:
        port, dash = state.ray_address.rsplit(":", 1)[1], state.dashboard_url.rsplit(":", 1)[1]
        args += ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={dash}", "--include-dashboard=true"]
        node_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single-machine mode: every listener on 127.0.0.1
    else:  # through loopback_node, which keeps the loopback addresses Ray would replace
        args = [sys.executable, "-m", "hpmkd.components.loopback_node", *args[1:],
                f"--address={state.ray_address}", "--node-ip-address=127.0.0.1"]
    attempt = 1
    while True:
        proc = launch(f"ray-{name}", args, root, node_env, cpus)
        state.nodes.append(proc)  # recorded before it is ready, so that `down` stops it whatever happens
        state.save()
        try:
            wait_for(f"Ray node {name}", lambda: node_ready(proc), proc)
            return proc
        except RuntimeError:
            timed_out = STARTUP_TIMEOUT_LINE in Path(proc.log).read_text(errors="replace")
            if not timed_out or attempt == STARTUP_ATTEMPTS:
                raise
            stop_process(proc)  # Ray gives a raylet 30 s to register, too little on a busy machine: again
            state.nodes.remove(proc)
            attempt += 1


def up(root: str | os.PathLike, nodes: int = 3, cpus: float = 1.0, head_cpus: float | None = None,
       port: int | None = None, dashboard_port: int | None = None, mlflow_port: int | None = None,
       node_env: dict[str, dict[str, str]] | None = None, mlflow: bool = True) -> ClusterState:
    """Start the cluster (module docstring). ``node_env``: extra environment per node name (e.g. a node-local
    ``HPMKD_DATA``). Raises if a cluster recorded under ``root`` still runs."""
    if nodes < 1 or cpus < 0 or (head_cpus is not None and head_cpus < 0):
        raise ConfigError(f"cluster up: --nodes must be >= 1 and CPUs >= 0, got nodes={nodes}, cpus={cpus}, "
                          f"head_cpus={head_cpus}.")
    folder = Path(root).expanduser().resolve()
    if (folder / STATE_FILE).exists() and any(alive(p.pid) for p in ClusterState.load(folder).processes()):
        raise ConfigError(f"cluster up: a cluster recorded in {folder / STATE_FILE} is still running; "
                          f"`hpmkd cluster down --root {root}` first.")
    for sub in ("shared/ray", "shared/cache", "mlflow/artifacts", "logs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    base_env = node_base_env(str(token))
    state = ClusterState(
        root=str(folder), ray_address=f"127.0.0.1:{port or free_port()}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port or free_port()}",
        tracking_uri=f"http://127.0.0.1:{mlflow_port or free_port()}" if mlflow else "",
        token_path=str(token), shared=str(folder / "shared"), nodes=[], mlflow=None,
        # Ray's sockets live under its temp dir and a socket path may not exceed 107 bytes: a short folder in /tmp
        ray_temp=tempfile.mkdtemp(prefix="hpmkd-ray-"))
    try:
        if mlflow:
            state.mlflow = launch("mlflow", [
                sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                "--port", state.tracking_uri.rsplit(":", 1)[1], "--workers", "1",
                "--backend-store-uri", f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}",
                "--artifacts-destination", str(folder / "mlflow" / "artifacts")], folder, {})
            state.save()
        for i, name in enumerate(node_names(nodes)):
            node_cpus = cpus if i or head_cpus is None else head_cpus
            start_node(state, name, node_cpus, (node_env or {}).get(name, {}), base_env)
        if state.mlflow is not None:
            wait_for("MLflow server", lambda: http_ok(f"{state.tracking_uri}/health"), state.mlflow)
    except BaseException:
        down(folder)
        raise
    return state


def add_node(root: str | os.PathLike, name: str, cpus: float, env: dict[str, str] | None = None) -> Process:
    """Start one more worker node in a running cluster (recorded like the others)."""
    state = ClusterState.load(root)
    return start_node(state, name, cpus, env or {}, node_base_env(state.token_path))


def kill_node(root: str | os.PathLike, name: str) -> list[int]:
    """SIGKILL one node's processes (its raylet, object store, Ray workers): a machine lost. Returns the PIDs."""
    state = ClusterState.load(root)
    proc = next((n for n in state.nodes if n.name == f"ray-{name}"), None)
    if proc is None:
        raise ConfigError(f"cluster: no node {name!r}; nodes: {', '.join(n.name[4:] for n in state.nodes)}.")
    pids = [p for p in descendants(proc.pid) if alive(p)]
    for pid in pids:
        with _gone():
            os.kill(pid, signal.SIGKILL)
    with _gone():
        os.kill(proc.pid, signal.SIGKILL)
    return pids


def stop_mlflow(root: str | os.PathLike) -> None:
    """Stop the cluster's MLflow server (its store stays); :func:`start_mlflow` starts it again."""
    state = ClusterState.load(root)
    stop_process(state.mlflow, signal.SIGKILL)


def start_mlflow(root: str | os.PathLike) -> None:
    """Start the cluster's MLflow server again, as ``up`` did, on the same port and store; wait until it answers."""
    state = ClusterState.load(root)
    state.mlflow = launch("mlflow", state.mlflow.argv, Path(state.root), {})
    state.save()
    wait_for("MLflow server", lambda: http_ok(f"{state.tracking_uri}/health"), state.mlflow)


def down(root: str | os.PathLike) -> list[str]:
    """Stop every process the cluster under ``root`` recorded (workers first, the head, then MLflow); the names
    of those that were still running."""
    state = ClusterState.load(root)
    stopped = []
    for proc in [*reversed(state.nodes), *state.processes()[len(state.nodes):]]:
        if alive(proc.pid) or descendants(proc.pid):
            stopped.append(proc.name)
        stop_process(proc)
    if state.ray_temp:
        shutil.rmtree(state.ray_temp, ignore_errors=True)
    return stopped


def status(root: str | os.PathLike) -> dict[str, object]:
    """The recorded processes and whether each lives, the services' health, and the driver environment."""
    state = ClusterState.load(root)
    return {
        "root": state.root,
        "processes": [{"name": p.name, "pid": p.pid, "alive": alive(p.pid), "cpus": p.cpus, "log": p.log}
                      for p in state.processes()],
        "dashboard_up": http_ok(f"{state.dashboard_url}/api/version") or http_ok(state.dashboard_url),
        "mlflow_up": bool(state.tracking_uri) and http_ok(f"{state.tracking_uri}/health"),
        "env": state.env(),
        "run_overrides": state.run_overrides(),
    }
