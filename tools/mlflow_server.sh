#!/usr/bin/env bash
# Start an MLflow tracking server with a database backend store and an artifact root.
#   tools/mlflow_server.sh                                   # sqlite in ./mlflow-server, 127.0.0.1:5000
#   tools/mlflow_server.sh --port 5555 --workers 1           # tests
#   tools/mlflow_server.sh --backend-store-uri postgresql://user:pw@db/mlflow \
#       --artifacts-destination s3://bucket/mlflow --host 0.0.0.0
# Prints the server's PID on the first line of --pid-file (default ./mlflow-server/server.pid).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
MLFLOW="${MLFLOW:-$here/.venv/bin/mlflow}"
state_dir="${MLFLOW_SERVER_DIR:-$PWD/mlflow-server}"
backend="" artifacts="" host="127.0.0.1" port="5000" workers="1" pid_file="" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --backend-store-uri) backend="$2"; shift 2 ;;
    --artifacts-destination) artifacts="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --pid-file) pid_file="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done
mkdir -p "$state_dir"
backend="${backend:-sqlite:///$state_dir/mlflow.db}"
artifacts="${artifacts:-$state_dir/artifacts}"
pid_file="${pid_file:-$state_dir/server.pid}"
"$MLFLOW" server --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
  --serve-artifacts --host "$host" --port "$port" --workers "$workers" "${extra[@]}" \
  >"$state_dir/server.log" 2>&1 &
pid=$!
echo "$pid" > "$pid_file"
for _ in $(seq 1 120); do
  if curl -fsS "http://$host:$port/health" >/dev/null 2>&1; then
    echo "$pid"
    echo "MLflow server on http://$host:$port (backend $backend, artifacts $artifacts, log $state_dir/server.log)" >&2
    exit 0
  fi
  if ! kill -0 "$pid" 2>/dev/null; then echo "mlflow server exited; see $state_dir/server.log" >&2; tail -5 "$state_dir/server.log" >&2; exit 1; fi
  sleep 0.5
done
echo "mlflow server did not answer on $host:$port within 60 s; see $state_dir/server.log" >&2
exit 1
