"""Starting or joining Ray.

``ray.address`` in the config (or ``$RAY_ADDRESS``) joins an existing cluster; otherwise a new local Ray instance
is started and its processes get ``MLFLOW_TRACKING_URI``.

A local Ray listens on 127.0.0.1 only, on every port it opens: the GCS, the raylet and object manager, every
worker, the dashboard (which serves the State API that Ray Train's placement-group cleaner needs), the dashboard
and runtime-env agents and the metrics exporter. Ray 2.60 binds its gRPC servers to all interfaces unless the
node's address is loopback, and ``ray.init`` replaces a loopback ``_node_ip_address`` with the machine's network
address while "cluster mode" is on (``ray._private.services.resolve_ip_for_localhost`` / ``get_node_ip_address``;
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, on by default on Linux); so while the local instance starts, cluster mode
is switched off for this process and the processes it spawns (not for later ones: ``ray start`` of a worker node
needs it). ``ray.bind_host`` names another address to bind to (e.g. this machine's network address, for clients
on other machines); ``ray.address`` joins a cluster whose binding is its own (a loopback address joins in the same
single-machine mode; another driver joining a loopback instance needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import ray
import ray._private.ray_constants as ray_constants

# Measured with Ray 2.60: a 0.2 s health check saves ~2 s per TorchTrainer.fit; the preemption watcher
# only prints noise outside preemptible clouds. Users can override both in the environment.
RAY_DEFAULT_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DEDUP_LOGS": "1",
}


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@contextlib.contextmanager
def exported(env: dict[str, str]) -> Iterator[None]:
    """``env`` in this process's environment while the block runs, then as it was before: the processes started
    meanwhile (a local Ray instance's raylet, and every worker process it starts later) inherit it."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def cluster_mode_off() -> Iterator[None]:
    """Ray's single-machine mode for this process and the Ray processes started meanwhile: the node address stays
    loopback, so every listener binds to it (module docstring)."""
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with exported({ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag


def reread_auth_token() -> None:
    """Ray caches the authentication token the first time a process connects; a process that connects again after
    ``ray.shutdown()`` (to another cluster, whose ``RAY_AUTH_TOKEN_PATH`` names another token: a test session that
    moves to a local multi-node cluster, a notebook) must read the token its environment names now."""
    from ray._raylet import AuthenticationTokenLoader  # Ray 2.60's token cache (ray._private.authentication)

    AuthenticationTokenLoader.instance().reset_cache()


def ensure_ray(address: str | None, num_cpus: int | None, tracking_uri: str | None, bind_host: str = "127.0.0.1",
               **init_kwargs: Any) -> dict[str, Any]:
    """Connect to Ray (once per process) and return its cluster resources. A new local instance binds to
    ``bind_host`` (module docstring).

    Stages pass the tracking URI to their workers explicitly; it is also exported to every Ray process so user code
    running inside Ray (``mlflow.start_run()``) records into the same store.
    """
    for key, value in RAY_DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        reread_auth_token()
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            # An existing cluster (or a Ray Job, whose runtime env Ray refuses to merge with ours): workers get the
            # tracking URI explicitly from each stage, so nothing needs to be injected here.
            # A local instance started by hpmkd listens on loopback only; a driver joining it must see itself at
            # that address too, or it looks for its node under the network address and waits forever.
            with cluster_mode_off() if address.rsplit(":", 1)[0] in LOOPBACK else contextlib.nullcontext():
                ray.init(address=address, **init_kwargs)
        else:
            # The Ray processes inherit the environment (RAY_DEFAULT_ENV, set above) rather than get it as the job's
            # runtime env: Ray runs a task whose runtime env differs from its pooled processes' on a new process, so
            # the worker processes ray.init starts (one per CPU) would sit unused and a stage's first task would wait
            # for a new one (1.3-1.6 s against 0.4 s, measured: docs/performance.md).
            loopback = bind_host in LOOPBACK
            with exported({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}), \
                    cluster_mode_off() if loopback else contextlib.nullcontext():
                ray.init(
                    address="local",  # a new local instance, never a stray `ray start` cluster on this machine
                    num_cpus=num_cpus,
                    dashboard_host=bind_host,
                    **({} if loopback else {"_node_ip_address": bind_host}),
                    **init_kwargs,
                )
    return ray.cluster_resources()
