"""The ``cluster/`` folder: manifests parse and carry what their tools need, versions agree across files, and the
scripts do what they promise.

Nothing here reaches a cloud, Kubernetes or SLURM. What runs for real: Ray's own cluster-launcher schema checks on
the launcher YAMLs, ``submit.py`` against a real local Ray cluster with token authentication, ``mlflow-server.sh``
``--print``, ``fetch_data.py`` on a bundled data set, and ``slurm.sbatch`` with stand-in ``srun``/``scontrol``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = [CLUSTER / "aws-gpu.yaml", CLUSTER / "gcp-gpu.yaml"]
KUBERAY = CLUSTER / "kuberay"
SMOKE = "conf/smoke.yaml"


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def ray_pin() -> str:
    """The Ray version pyproject.toml pins (``ray[...]==X``)."""
    dependencies = pyproject()["project"]["dependencies"]
    pins = [re.fullmatch(r"ray(\[[^\]]*\])?==(\S+)", d.replace(" ", "")) for d in dependencies]
    versions = [m.group(2) for m in pins if m]
    assert len(versions) == 1, dependencies
    return versions[0]


def load_docs(path: Path) -> list:
    return list(yaml.safe_load_all(path.read_text()))


def load_one(path: Path) -> dict:
    (doc,) = load_docs(path)
    return doc


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"cluster_{name}", CLUSTER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without the variables these scripts read, plus ``extra``."""
    drop = ("MLFLOW_", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_", "HPMKD_MLFLOW_ROOT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]
    ]


# ---------------------------------------------------------------------------------------------- every YAML file


def test_cluster_folder_has_every_manifest():
    found = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*.yaml")}
    assert {"aws-gpu.yaml", "gcp-gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
            "kuberay/mlflow.yaml"} <= found


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_yaml_parses_into_mappings(path):
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) and d for d in docs)


# -------------------------------------------------------------------------------------------- launcher YAMLs


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_has_cpu_head_and_gpu_workers(path):
    cfg = load_one(path)
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] in {"aws", "gcp"}
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"]["TRAIN_DRIVER_RESOURCE"] >= 1
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
    if cfg["provider"]["type"] == "gcp":  # GCP does not detect resources: they must be stated
        gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    else:  # AWS detects them from the instance type: a g* / p* family has NVIDIA GPUs
        gpu = [t for t in workers.values() if re.match(r"^[gp]\d", t["node_config"]["InstanceType"])]
    assert gpu, "no GPU worker type"
    docker = cfg["docker"]
    assert docker["image"] == f"rayproject/ray:{ray_pin()}-py311-gpu"
    for options in (docker["head_run_options"], docker["worker_run_options"]):
        assert any(o.startswith("--shm-size=") for o in options)
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    assert any("pip install" in c and "/home/ray/hpmkd" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["/home/ray/hpmkd"] == "."


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_passes_rays_own_checks(path):
    """The checks ``ray up`` runs before it calls the cloud: defaults merged, then the JSON schema and node types."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(load_one(path))))


def test_rays_schema_check_rejects_fractional_node_resources():
    """Why the head offers TRAIN_DRIVER_RESOURCE: 1 rather than a fraction: the launcher schema wants integers."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load_one(LAUNCHERS[0])
    cfg["available_node_types"][cfg["head_node_type"]]["resources"]["TRAIN_DRIVER_RESOURCE"] = 0.01
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(cfg))


# --------------------------------------------------------------------------------------------------- KubeRay


def test_raycluster_manifest():
    rc = load_one(KUBERAY / "raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    spec = rc["spec"]
    assert spec["rayVersion"] == ray_pin() == "2.60.0"
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert "TRAIN_DRIVER_RESOURCE" in spec["headGroupSpec"]["rayStartParams"]["resources"]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for pod in pod_specs(spec):
        shm = {v["name"]: v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        for container in pod["containers"]:
            assert container["image"].endswith(f":{pyproject()['project']['version']}")
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/dev/shm"] in shm, "every Ray container needs /dev/shm from a memory emptyDir"


def test_raycluster_resources_as_rays_kuberay_autoscaler_reads_them():
    """Ray's own translation of a RayCluster into autoscaler node types (quoting of ``resources``, GPU limits)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    cr = load_one(KUBERAY / "raycluster.yaml")
    cr["metadata"]["namespace"] = "default"  # set by the API server on a real cluster
    cfg = _derive_autoscaling_config_from_ray_cr(cr)
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["headgroup"]["resources"]["TRAIN_DRIVER_RESOURCE"] == 1
    assert types["gpu"]["resources"]["GPU"] == 1 and types["gpu"]["resources"]["CPU"] == 8
    assert (types["gpu"]["min_workers"], types["gpu"]["max_workers"]) == (0, 4)


def test_rayjob_runs_hpmkd_on_the_raycluster_spec():
    job = load_one(KUBERAY / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"] == load_one(KUBERAY / "raycluster.yaml")["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray_pin()
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["hpmkd", "run"]
    config = words[2]
    assert config.startswith("/home/ray/hpmkd/")  # where cluster/Dockerfile puts the repository
    assert (REPO / config.removeprefix("/home/ray/hpmkd/")).is_file(), f"{config} is not in the repository"
    tracking = words[words.index("--tracking-uri") + 1]
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert any(o.startswith("ray.storage_path=s3://") for o in overrides)
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == tracking
    assert env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0


def test_mlflow_manifest_serves_the_uri_the_ray_pods_use():
    docs = {d["kind"]: d for d in load_docs(KUBERAY / "mlflow.yaml")}
    service, deployment = docs["Service"], docs["Deployment"]
    job_env = yaml.safe_load(load_one(KUBERAY / "rayjob.yaml")["spec"]["runtimeEnvYAML"])["env_vars"]
    uri = re.fullmatch(r"http://([^:/]+):(\d+)", job_env["MLFLOW_TRACKING_URI"])
    assert uri and service["metadata"]["name"] == uri.group(1)
    assert service["spec"]["ports"][0]["port"] == int(uri.group(2))
    assert service["spec"]["type"] == "ClusterIP"
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    script = " ".join(container["args"])
    assert "--host 0.0.0.0" in script
    allowed = re.search(r'--allowed-hosts "([^"]+)"', script).group(1).split(",")
    assert f"{uri.group(1)}:*" in allowed and "localhost:*" in allowed
    env = {e["name"]: e for e in container["env"]}
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"], f"{name} must come from a Secret"
    assert "postgresql://" not in json.dumps(docs), "no database URI (password) in the manifest itself"
    image_version = container["image"].rsplit(":v", 1)[1]
    assert tuple(int(x) for x in image_version.split(".")[:2]) >= (3, 17)


def test_every_file_names_the_pinned_ray_version():
    pin = ray_pin()
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{pin}-py311-gpu" in dockerfile
    assert f"ray.__version__ == '{pin}'" in dockerfile
    for text in [p.read_text() for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in {".yaml", ".md", ""}]:
        for version in re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text) + re.findall(r'rayVersion: "([^"]+)"', text):
            assert version == pin


# ---------------------------------------------------------------------------------------------- mlflow-server.sh


def mlflow_print(*args: str, **env: str) -> list[str]:
    result = run(["bash", str(CLUSTER / "mlflow-server.sh"), "--print", *args], clean_env(**env))
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_mlflow_server_defaults_to_localhost_and_sqlite(tmp_path):
    words = mlflow_print(HOME=str(tmp_path))
    root = tmp_path / "hpmkd-mlflow"
    assert words[:2] == [f"MLFLOW_BACKEND_STORE_URI=sqlite:///{root}/mlflow.db",
                         f"MLFLOW_ARTIFACTS_DESTINATION={root}/mlartifacts"]
    assert words[2:4] == ["mlflow", "server"]
    assert option(words, "--host") == "127.0.0.1" and option(words, "--port") == "5000"
    assert "--allowed-hosts" not in words
    assert not root.exists(), "--print creates nothing"


def test_mlflow_server_switches_to_postgres_s3_and_all_interfaces_when_asked(tmp_path):
    words = mlflow_print("--host", "0.0.0.0", "--artifacts-destination", "s3://bucket/mlflow",
                         "--allowed-hosts", "mlflow:*", "--workers", "2",
                         HOME=str(tmp_path), MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:s3cret@db:5432/mlflow")
    assert words[0] == "MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:****@db:5432/mlflow"
    assert "s3cret" not in " ".join(words)
    assert words[1] == "MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/mlflow"
    assert option(words, "--host") == "0.0.0.0"
    assert option(words, "--allowed-hosts") == "mlflow:*,localhost:*,127.0.0.1:*"
    assert option(words, "--workers") == "2"
    # a flag wins over MLflow's own environment variable
    forced = mlflow_print("--host", "127.0.0.1", HOME=str(tmp_path), MLFLOW_HOST="0.0.0.0")
    assert option(forced, "--host") == "127.0.0.1"
    assert option(mlflow_print(HOME=str(tmp_path), MLFLOW_HOST="10.0.0.5"), "--host") == "10.0.0.5"


@pytest.mark.parametrize("args, message", [(["--port", "http"], "--port must be a number"),
                                           (["--public"], "unknown option '--public'"),
                                           (["--host"], "--host needs a value")])
def test_mlflow_server_rejects_bad_options(args, message, tmp_path):
    result = run(["bash", str(CLUSTER / "mlflow-server.sh"), *args], clean_env(HOME=str(tmp_path)))
    assert result.returncode == 2 and message in result.stderr


# ------------------------------------------------------------------------------------------------- submit.py


def test_submit_dry_run_prints_entrypoint_and_runtime_env():
    token = secrets.token_hex(32)
    result = run([sys.executable, str(CLUSTER / "submit.py"), SMOKE, "--dry-run",
                  "--address", "http://127.0.0.1:9",  # nothing listens there: a dry run must not connect
                  "--tracking-uri", "http://mlflow:5000", "--set", "train.epochs=1", "--env", "HPMKD_DATA=/data"],
                 clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token))
    assert result.returncode == 0, result.stderr
    sub = json.loads(result.stdout)
    assert sub["address"] == "http://127.0.0.1:9"
    assert sub["entrypoint"] == (f"python -m hpmkd.cli run {SMOKE} --tracking-uri http://mlflow:5000 "
                                 "--set train.epochs=1")
    assert sub["runtime_env"]["working_dir"] == str(REPO)
    assert ".venv" in sub["runtime_env"]["excludes"]
    assert sub["runtime_env"]["env_vars"] == {"HPMKD_DATA": "/data", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
                                              "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    assert sub["auth"] == "token from $RAY_AUTH_TOKEN"
    assert token not in result.stdout + result.stderr
    assert "ray.storage_path is not set" in result.stderr  # smoke.yaml has none and no --set gave one


def test_submit_dry_run_takes_uri_and_address_from_the_environment():
    result = run([sys.executable, str(CLUSTER / "submit.py"), str(REPO / SMOKE), "--dry-run",
                  "--set", "ray.storage_path=s3://bucket/hpmkd"],
                 clean_env(MLFLOW_TRACKING_URI="http://tracking.internal:5000", RAY_ADDRESS="http://head:8265"))
    assert result.returncode == 0, result.stderr
    sub = json.loads(result.stdout)
    assert sub["address"] == "http://head:8265"
    assert sub["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == "http://tracking.internal:5000"
    assert shlex.split(sub["entrypoint"])[5:] == ["--tracking-uri", "http://tracking.internal:5000",
                                                  "--set", "ray.storage_path=s3://bucket/hpmkd"]
    assert "storage_path" not in result.stderr


@pytest.mark.parametrize("args, message", [
    ([SMOKE], "no MLflow tracking URI"),
    ([SMOKE, "--tracking-uri", "sqlite:////tmp/mlflow.db"], "names a local file"),
    ([SMOKE, "--tracking-uri", "./mlruns"], "names a local file"),
    (["conf/no_such_experiment.yaml", "--tracking-uri", "http://m:5000"], "config file not found"),
    ([SMOKE, "--tracking-uri", "http://m:5000", "--env", "NOVALUE"], "expected KEY=VALUE"),
])
def test_submit_rejects_bad_input(args, message, capsys, monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(REPO)
    assert load_module("submit").main([*args, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_submit_rejects_a_config_outside_the_repository(tmp_path, capsys):
    outside = tmp_path / "x.yaml"
    outside.write_text((REPO / SMOKE).read_text())
    assert load_module("submit").main([str(outside), "--tracking-uri", "http://m:5000", "--dry-run"]) == 2
    assert "outside the repository" in capsys.readouterr().err


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def token_cluster():
    """A real one-node Ray cluster (``ray start --head``) that demands a token; yields (job server address, token).

    Every port is chosen free (the dashboard agent's default, 52365, clashes with any other Ray on the machine) and
    the session lives in its own short temp dir, so other local Ray users neither see it nor collide with it.
    ``--block`` ties the Ray processes to this one; SIGTERM drains and stops them.
    """
    token = secrets.token_hex(32)
    gcs, dashboard, agent = free_ports(3)
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's unix sockets live under it
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         "--num-cpus=1", f"--object-store-memory={100 * 1024**2}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        for _ in range(180):  # the job server answers (401 without a token) once the dashboard is up
            assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.5)
        yield address, token
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
def test_submit_runs_a_job_on_a_token_protected_cluster(token_cluster):
    address, token = token_cluster
    submit = [sys.executable, str(CLUSTER / "submit.py"), SMOKE, "--validate-only", "--follow", "--address", address]
    ok = run(submit, clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), timeout=240)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Submitted Ray job raysubmit_" in ok.stdout
    assert f"OK {SMOKE}" in ok.stdout  # `hpmkd validate` ran on the cluster, from the uploaded checkout
    assert ok.stdout.rstrip().endswith("SUCCEEDED")
    refused = run(submit, clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32)))
    assert refused.returncode == 1
    assert "could not submit" in refused.stderr and "authentication" in refused.stderr.lower()


# ------------------------------------------------------------------------------------------ fetch_data.py, SLURM


def test_fetch_data_loads_and_describes_data_sets(tmp_path, capsys):
    fetch = load_module("fetch_data")
    assert fetch.main(["--root", str(tmp_path), "digits", "no_such_data"]) == 2
    out, err = capsys.readouterr()
    assert re.search(r"^digits: train \d+, val \d+, test \d+, 10 classes, fingerprint [0-9a-f]+", out, re.M)
    assert "unknown dataset 'no_such_data'" in err


def test_slurm_script_runs_hpmkd_under_symmetric_run(tmp_path):
    """With stand-in ``srun``/``scontrol``: checks the command the batch script builds and the token it creates."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (shims / "scontrol").write_text('#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && printf "n1\\nn2\\nn3\\n"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    token_path = tmp_path / "home" / ".ray" / "auth_token"
    env = clean_env(HOME=str(tmp_path / "home"), SRUN_ARGS=str(tmp_path / "srun.args"), SLURM_JOB_NODELIST="n[1-3]",
                    SLURM_CPUS_PER_TASK="16", MLFLOW_TRACKING_URI="http://mlflow.internal:5000",
                    HPMKD_STORAGE_PATH="/shared/ray", HPMKD_VENV=str(Path(sys.executable).parents[1]),
                    RAY_HEAD_IP="10.1.2.3")
    env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    result = run(["bash", str(CLUSTER / "slurm.sbatch"), SMOKE, "--set", "train.epochs=1"], env)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args == ["--nodes=3", "--ntasks-per-node=1",
                    "ray", "symmetric-run", "--address", "10.1.2.3:6379", "--min-nodes", "3", "--num-cpus=16", "--",
                    "env", "RAY_ADDRESS=10.1.2.3:6379",
                    "hpmkd", "run", SMOKE, "--set", "train.epochs=1",
                    "--tracking-uri", "http://mlflow.internal:5000", "--set", "ray.storage_path=/shared/ray"]
    assert re.fullmatch(r"[0-9a-f]{64}", token_path.read_text())
    assert oct(token_path.stat().st_mode & 0o777) == "0o600"
    missing = run(["bash", str(CLUSTER / "slurm.sbatch"), SMOKE], {**env, "MLFLOW_TRACKING_URI": ""})
    assert missing.returncode != 0 and "set MLFLOW_TRACKING_URI" in missing.stderr
