#!/usr/bin/env bash
# Start an MLflow tracking server for hpmkd.
#
#   cluster/mlflow-server.sh [--print] [--host ADDR] [--port N] [--root DIR]
#                            [--backend-store-uri URI] [--artifacts-destination URI]
#                            [--allowed-hosts LIST] [--workers N]
#
# Defaults: bound to 127.0.0.1 (this machine only), port 5000, runs in a SQLite file and artifacts folder under
# --root (default $HOME/hpmkd-mlflow). Artifacts are served through the server (mlflow-artifacts:/ URIs), so clients
# need nothing but HTTP access to it.
#
# Team / cluster server: PostgreSQL for runs, S3 (or GCS) for artifacts, reachable by the Ray nodes:
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db.internal:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow \
#   cluster/mlflow-server.sh --host 0.0.0.0 --allowed-hosts 'mlflow.internal:*'
#
# Every option can also come from the environment variable MLflow itself reads for it (MLFLOW_HOST, MLFLOW_PORT,
# MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_SERVER_ALLOWED_HOSTS, MLFLOW_WORKERS), plus
# HPMKD_MLFLOW_ROOT for --root; a flag wins over its variable. Give the database password through the environment
# (or a ~/.pgpass file) rather than a flag: flags are visible to every user in `ps`. The script itself hands the
# store URIs to mlflow through those variables, never on mlflow's command line.
#
# Binding: the server has no authentication of its own, so it listens on 127.0.0.1 unless you ask for another
# address with --host. Bind 0.0.0.0 only on a private network (the Ray nodes' VPC or a Kubernetes pod), never on an
# address the internet can reach; browse it from a laptop through an SSH tunnel or a port-forward instead.
#
# --allowed-hosts: MLflow answers only requests whose Host header matches this list (protection against DNS
# rebinding). MLflow's default is localhost plus private IP addresses, so clients that reach the server by a DNS
# name (http://mlflow.internal:5000) get "403 Invalid Host header" until the name is listed. The header includes the
# port, so list "name:*" or "name:5000". Giving the list replaces MLflow's default; this script appends
# "localhost:*,127.0.0.1:*" so tunnels and port-forwards keep working (our choice).
#
# --print prints the mlflow command instead of running it (nothing is checked, created or started).

set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
# Shell-quote one word only when it needs it, so --print output stays readable and can be pasted back.
quote() { if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi; }
die() { echo "mlflow-server.sh: error: $*" >&2; exit 2; }

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
root="${HPMKD_MLFLOW_ROOT:-$HOME/hpmkd-mlflow}"
backend="${MLFLOW_BACKEND_STORE_URI:-}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-}"
allowed="${MLFLOW_SERVER_ALLOWED_HOSTS:-}"
workers="${MLFLOW_WORKERS:-}"
print_only=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --print) print_only=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --host|--port|--root|--backend-store-uri|--artifacts-destination|--allowed-hosts|--workers)
            [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value."
            case "$1" in
                --host) host="$2" ;;
                --port) port="$2" ;;
                --root) root="$2" ;;
                --backend-store-uri) backend="$2" ;;
                --artifacts-destination) artifacts="$2" ;;
                --allowed-hosts) allowed="$2" ;;
                --workers) workers="$2" ;;
            esac
            shift 2 ;;
        *) die "unknown option '$1' (see --help)." ;;
    esac
done

[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'."
[[ -z "$workers" || "$workers" =~ ^[0-9]+$ ]] || die "--workers must be a number, got '$workers'."
root="${root%/}"
[[ "$root" = /* ]] || root="$PWD/$root"  # absolute: the server may be started from anywhere
backend="${backend:-sqlite:///$root/mlflow.db}"
artifacts="${artifacts:-$root/mlartifacts}"
if [[ -n "$allowed" ]]; then
    allowed="$allowed,localhost:*,127.0.0.1:*"
fi

# The stores go to mlflow through the environment variables it reads itself, so a database password never
# appears in the process list; --print shows them with the password masked.
export MLFLOW_BACKEND_STORE_URI="$backend" MLFLOW_ARTIFACTS_DESTINATION="$artifacts"
cmd=(mlflow server --host "$host" --port "$port")
[[ -n "$allowed" ]] && cmd+=(--allowed-hosts "$allowed")
[[ -n "$workers" ]] && cmd+=(--workers "$workers")
masked_backend="$(printf '%s' "$backend" | sed -E 's#(://[^:/@]+):[^@]*@#\1:****@#')"

if [[ $print_only -eq 1 ]]; then
    line="MLFLOW_BACKEND_STORE_URI=$(quote "$masked_backend") MLFLOW_ARTIFACTS_DESTINATION=$(quote "$artifacts")"
    for w in "${cmd[@]}"; do line+=" $(quote "$w")"; done
    echo "$line"
    exit 0
fi

command -v mlflow >/dev/null \
    || die "the 'mlflow' command is not on PATH: activate the hpmkd environment or pip install 'mlflow>=3.17'."
# Drivers must be importable by the Python that runs mlflow (the interpreter named in its script's first line).
mlflow_python="$(head -n 1 "$(command -v mlflow)" | sed 's/^#! *//')"
has_module() { "$mlflow_python" -c "import $1" 2>/dev/null; }
case "$backend" in
    postgresql*) has_module psycopg2 || die "a PostgreSQL backend needs its driver: pip install psycopg2-binary." ;;
    mysql*) has_module pymysql || die "a MySQL backend needs a driver: pip install pymysql (URI mysql+pymysql://...)." ;;
esac
case "$artifacts" in
    s3://*) has_module boto3 || die "S3 artifacts need boto3: pip install boto3 (credentials: AWS variables or role)." ;;
    gs://*) has_module google.cloud.storage || die "GCS artifacts need google-cloud-storage: pip install it." ;;
esac
# Local stores: create their folders only now that every check has passed.
[[ "$backend" == sqlite:///* ]] && mkdir -p "$(dirname "${backend#sqlite:///}")"
[[ "$artifacts" == *://* ]] || mkdir -p "$artifacts"
case "$host" in
    127.0.0.1|localhost|::1) ;;
    *) [[ -n "$allowed" ]] || echo "mlflow-server.sh: note: listening on $host without --allowed-hosts: clients" \
        "that name this server by DNS get HTTP 403 (Invalid Host header); localhost and private IPs work." >&2 ;;
esac

echo "MLflow tracking server on http://$host:$port  runs: $masked_backend  artifacts: $artifacts" >&2
exec "${cmd[@]}"
