#!/usr/bin/env bash
# A "cluster" on one machine, on loopback only: a Ray head with token authentication and an
# MLflow tracking server (SQLite file + local artifact folder) that every Ray job logs to.
#
#   bash infra/local_cluster.sh start    # start both; prints the environment to use
#   source .local-cluster/env            # RAY_ADDRESS, the token, MLFLOW_TRACKING_URI
#   ray job submit --working-dir . -- python -m kpscale.train train.steps=200
#   bash infra/local_cluster.sh stop     # stop both (the state folder is kept)
#
# Settings, from the environment: KPSCALE_CLUSTER_DIR (.local-cluster), RAY_PORT (6380),
# RAY_DASHBOARD_PORT (8265), MLFLOW_PORT (5000), MLFLOW_WORKERS (2), RAY_NUM_CPUS (all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(realpath -m "${KPSCALE_CLUSTER_DIR:-.local-cluster}")
BIN=$(realpath -m "${KPSCALE_BIN:-.venv/bin}")  # where ray and mlflow are installed
RAY_PORT=${RAY_PORT:-6380}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
MLFLOW_PORT=${MLFLOW_PORT:-5000}

start() {
  mkdir -p "$DIR/artifacts"
  if [ ! -s "$DIR/auth_token" ]; then  # the cluster's own token, not the user's ~/.ray/auth_token
    (umask 077 && "$BIN/python" -c "import secrets; print(secrets.token_hex(32))" > "$DIR/auth_token")
  fi
  cat > "$DIR/env" <<EOF
export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$DIR/auth_token
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
EOF
  # shellcheck disable=SC1091
  source "$DIR/env"

  # The MLflow server starts in the background while Ray starts; both are waited for below.
  if [ -s "$DIR/mlflow.pid" ] && kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null; then
    echo "MLflow server already running (pid $(cat "$DIR/mlflow.pid"))"
  else
    # Its own session, so that stop can end the server and its workers as one process group.
    # No server-side jobs: they run GenAI judges, which kpscale does not use, in seven more processes.
    # Two request workers (MLflow's default is four): one machine's runs log to it, and each
    # worker is a process that imports MLflow while Ray starts beside it.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
      --workers "${MLFLOW_WORKERS:-2}" \
      --backend-store-uri "sqlite:///$DIR/mlflow.db" --artifacts-destination "$DIR/artifacts" \
      > "$DIR/mlflow.log" 2>&1 < /dev/null &
    echo $! > "$DIR/mlflow.pid"
  fi

  # Ray's socket paths must stay under 107 bytes: its temp folder lives in /tmp.
  [ -s "$DIR/ray_temp" ] || mktemp -d /tmp/kpray-XXXXXX > "$DIR/ray_temp"
  # PATH first: a job's `python` is the first on the head's PATH, the project's environment.
  # Its own session: the head's processes share one process group, which stop ends (`ray stop`
  # would end every Ray on the machine).
  PATH="$BIN:$PATH" setsid "$BIN/ray" start --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
    --temp-dir="$(cat "$DIR/ray_temp")" --disable-usage-stats ${RAY_NUM_CPUS:+--num-cpus="$RAY_NUM_CPUS"} \
    > "$DIR/ray.log" 2>&1 &
  echo $! > "$DIR/ray.pgid"
  wait $! || { tail -20 "$DIR/ray.log"; echo "ray start failed" >&2; exit 1; }
  wait_for_mlflow
  wait_for_job_agent
  echo "local cluster up: Ray dashboard $RAY_ADDRESS (token in $DIR/auth_token), MLflow $MLFLOW_TRACKING_URI"
  echo "use it with: source $DIR/env"
}

wait_for_mlflow() {
  for _ in $(seq 120); do
    curl -sf "$MLFLOW_TRACKING_URI/health" > /dev/null && return 0
    kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null || { tail -20 "$DIR/mlflow.log"; echo "MLflow server failed" >&2; exit 1; }
    sleep 1
  done
  echo "MLflow server did not answer on $MLFLOW_TRACKING_URI" >&2; exit 1
}

# `ray start` returns before the node's job agent has registered; a job submitted then fails
# with "No available agent". Submit a no-op until one is taken.
wait_for_job_agent() {
  for _ in $(seq 60); do
    out=$("$BIN/ray" job submit --address "$RAY_ADDRESS" -- python -c 0 2>&1) && return 0
    grep -q "No available agent" <<< "$out" || { echo "$out" | tail -5 >&2; exit 1; }
    sleep 2
  done
  echo "the Ray job agent did not come up" >&2; exit 1
}

# End a process group (its leader's pid in FILE) with SIGNAL (TERM), then KILL what is left after 30 s.
stop_group() {
  [ -s "$1" ] || return 0
  group=$(cat "$1")
  kill -"${2:-TERM}" -- "-$group" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 -- "-$group" 2>/dev/null || break; sleep 1; done
  kill -9 -- "-$group" 2>/dev/null || true
  rm -f "$1"
}

stop() {
  stop_group "$DIR/ray.pgid" KILL  # as `ray stop --force`: Ray's daemons ignore TERM; its workers end with the raylet
  stop_group "$DIR/mlflow.pid"
  if [ -s "$DIR/ray_temp" ]; then
    rm -rf "$(cat "$DIR/ray_temp")" "$DIR/ray_temp"
  fi
  echo "local cluster stopped (runs and artifacts kept in $DIR)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: bash infra/local_cluster.sh start|stop" >&2; exit 2 ;;
esac
