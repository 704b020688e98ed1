#!/usr/bin/env bash
# A multi-node Ray cluster on ONE machine: a head node and worker node(s), each its own
# `ray start --block` process offering its own CPUs. Use it to try the cluster workflow
# (`ray job submit`, `serve deploy`) before renting machines, and in the multi-node test.
#
#   cluster/local-cluster.sh start      # head + worker node(s); prints the addresses to use
#   cluster/local-cluster.sh status     # `ray status` of this cluster (nodes, resources, usage)
#   cluster/local-cluster.sh address    # the Jobs/dashboard address, for RAY_ADDRESS or --address
#   cluster/local-cluster.sh stop       # stops the nodes this script started, and nothing else
#
# `stop` never runs `ray stop` (which stops EVERY Ray instance of the machine, other people's too):
# each node runs in its own process group, recorded in $RQA_CLUSTER_DIR, and only those groups are
# killed.
#
# Settings, all optional (environment variables):
#   RQA_CLUSTER_DIR         pid files, logs and the Ray temp dir (default: /tmp/rqa-cluster-$USER).
#                           Keep it short: Ray's socket paths live under it.
#   RQA_HEAD_HOST           how this machine reaches the head node; the dashboard binds to it
#                           (default: 127.0.0.1, so the Jobs API is not open to the network)
#   RQA_GCS_PORT            head node's GCS port, the cluster address (default: 6390)
#   RQA_DASHBOARD_PORT      dashboard and Jobs API port (default: 8266)
#   RQA_CLIENT_PORT         Ray Client port (default: 10011)
#   RQA_HEAD_CPUS           logical CPUs the head node offers (default: 3)
#   RQA_WORKER_CPUS         logical CPUs each worker node offers (default: 3)
#   RQA_WORKER_NODES        number of worker nodes (default: 1)
#   RQA_OBJECT_STORE_BYTES  object store size per node (default: 300000000)
#   RQA_START_TIMEOUT_S     how long `start` waits for every node to join and the Jobs API to take
#                           submissions (default: 120)
#   RQA_STOP_TIMEOUT_S      how long `stop` lets each node drain before killing it (default: 15)
#   RAY, PYTHON             the `ray` command and Python to use (default: those on PATH, i.e. of
#                           the activated virtual environment, which must have this project installed)
# Ports other than the three above are chosen free at start. The defaults are not Ray's own
# (6379/8265/10001), so the cluster can run next to a default `ray start` or `ray.init()`.
set -euo pipefail

STATE_DIR=$(realpath -m -- "${RQA_CLUSTER_DIR:-/tmp/rqa-cluster-${USER:-$(id -un)}}")
HEAD_HOST=${RQA_HEAD_HOST:-127.0.0.1}
GCS_PORT=${RQA_GCS_PORT:-6390}
DASHBOARD_PORT=${RQA_DASHBOARD_PORT:-8266}
CLIENT_PORT=${RQA_CLIENT_PORT:-10011}
HEAD_CPUS=${RQA_HEAD_CPUS:-3}
WORKER_CPUS=${RQA_WORKER_CPUS:-3}
WORKER_NODES=${RQA_WORKER_NODES:-1}
OBJECT_STORE_BYTES=${RQA_OBJECT_STORE_BYTES:-300000000}
START_TIMEOUT_S=${RQA_START_TIMEOUT_S:-120}
# The `ray` and Python of the active virtual environment (the nodes run Ray from it).
RAY=${RAY:-ray}
if [ -z "${PYTHON:-}" ]; then
  PYTHON=$(dirname "$(command -v "$RAY" || echo /nonexistent/ray)")/python
  [ -x "$PYTHON" ] || PYTHON=python3
fi

export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
# Ray's own ports (GCS, raylets, the dashboard and its Jobs API, which runs any code it is sent)
# listen on every interface whatever --node-ip-address says, so Ray's token authentication is on
# by default: every node and every client (`ray job submit`, `serve deploy`, ray.init) needs
# RAY_AUTH_MODE=token and the token, from ~/.ray/auth_token (made here if there is none), or
# RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH. RAY_AUTH_MODE=disabled turns it off, with a warning. The
# dashboard binds to RQA_HEAD_HOST (127.0.0.1) either way.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s ~/.ray/auth_token ]; then
  "$RAY" get-auth-token --generate >/dev/null
fi
[ "$RAY_AUTH_MODE" = token ] || echo "warning: RAY_AUTH_MODE=$RAY_AUTH_MODE: anyone who reaches this machine's Ray ports can run code on the cluster" >&2

gcs_address() { echo "$HEAD_HOST:$GCS_PORT"; }
dashboard_address() { echo "http://$HEAD_HOST:$DASHBOARD_PORT"; }

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# pid files of the nodes this script started, head first
node_pid_files() { ls "$STATE_DIR"/pids/*.pid 2>/dev/null | sort || true; }

alive() { kill -0 "$1" 2>/dev/null; }

# Ray processes (ray::..., raylet, gcs_server, ray's Python) holding files open in $STATE_DIR.
ray_processes_of_this_cluster() {
  local d pid
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [ "$pid" = "$$" ] && continue
    tr '\0' ' ' 2>/dev/null <"$d/cmdline" | grep -q ray || continue
    ls -l "$d/fd" 2>/dev/null | grep -qF -- "$STATE_DIR/" && echo "$pid"
  done
  return 0
}

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# Whether something on this machine accepts connections on port $1.
port_open() {
  "$PYTHON" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()' "$1" \
    2>/dev/null
}

declare -A AGENT_PORTS  # node name -> its dashboard agent's HTTP port

# Start one node: `ray start --block` in a new session (its own process group, id = its pid).
start_node() {
  local name=$1; shift
  local log="$STATE_DIR/logs/$name.log"
  AGENT_PORTS[$name]=$(free_port)
  # Each node its own Ray temp dir, so each node's log monitor forwards only its own workers' output.
  # RAY_ADDRESS, inherited by every Ray worker process of the node: Ray code that looks for "the"
  # cluster without an address (Ray Train's placement group cleaner does) finds this one, also
  # when other Ray instances run on the machine.
  # RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: the node's Serve proxy drops client request ids that
  # are not short safe ids before they reach a log (serve_app/request_ids.py).
  env -u RAY_API_SERVER_ADDRESS RAY_ADDRESS="$(gcs_address)" \
  RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.request_ids:proxy_middlewares \
  setsid "$RAY" start --block --temp-dir="$STATE_DIR/$name" \
    --object-store-memory="$OBJECT_STORE_BYTES" \
    --dashboard-agent-listen-port="${AGENT_PORTS[$name]}" --dashboard-agent-grpc-port="$(free_port)" \
    --runtime-env-agent-port="$(free_port)" --metrics-export-port="$(free_port)" \
    --min-worker-port=0 --max-worker-port=0 --disable-usage-stats "$@" \
    </dev/null >"$log" 2>&1 &
  echo $! >"$STATE_DIR/pids/$name.pid"
}

# Alive nodes of this cluster, through the dashboard's state API (0 while it is not up yet).
# Ray's client sends the cluster's auth token (~/.ray/auth_token) when token auth is on.
alive_nodes() {
  "$PYTHON" - "$(dashboard_address)" <<'PY' 2>/dev/null || echo 0
import sys
from ray.util.state import list_nodes
print(sum(n.state == "ALIVE" for n in list_nodes(address=sys.argv[1], timeout=5)))
PY
}

fail_start() {
  echo "error: $1; logs in $STATE_DIR/logs:" >&2
  tail -n 20 "$STATE_DIR"/logs/*.log >&2 || true
  cmd_stop >&2
  exit 1
}

cmd_start() {
  if [ -n "$(node_pid_files)" ]; then
    for f in $(node_pid_files); do
      if alive "$(cat "$f")"; then
        echo "a cluster started from $STATE_DIR is running; '$0 stop' first" >&2
        exit 1
      fi
    done
    rm -f "$STATE_DIR"/pids/*.pid
  fi
  mkdir -p "$STATE_DIR/pids" "$STATE_DIR/logs"

  start_node head --head --port="$GCS_PORT" --num-cpus="$HEAD_CPUS" --include-dashboard=true \
    --dashboard-host="$HEAD_HOST" --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$CLIENT_PORT"
  local deadline=$((SECONDS + START_TIMEOUT_S))
  until [ "$(alive_nodes)" -ge 1 ]; do
    alive "$(cat "$STATE_DIR/pids/head.pid")" || fail_start "the head node exited"
    [ $SECONDS -lt $deadline ] || fail_start "the head node did not come up in ${START_TIMEOUT_S} s"
    sleep 1
  done

  for i in $(seq 1 "$WORKER_NODES"); do
    start_node "worker$i" --address="$(gcs_address)" --num-cpus="$WORKER_CPUS"
  done
  local want=$((WORKER_NODES + 1))
  until [ "$(alive_nodes)" -ge "$want" ]; do
    for f in $(node_pid_files); do
      alive "$(cat "$f")" || fail_start "node $(basename "$f" .pid) exited"
    done
    [ $SECONDS -lt $deadline ] || fail_start "not all $want nodes joined in ${START_TIMEOUT_S} s"
    sleep 1
  done
  # The Jobs API hands every submission to the head node's dashboard agent, which can come up well
  # after its node is listed alive on a busy machine, while the API waits only 10 s for it before
  # answering "No available agent to submit job".
  until port_open "${AGENT_PORTS[head]}"; do
    alive "$(cat "$STATE_DIR/pids/head.pid")" || fail_start "the head node exited"
    [ $SECONDS -lt $deadline ] || fail_start "the head node's job agent did not come up in ${START_TIMEOUT_S} s"
    sleep 1
  done
  cat <<MSG
Ray cluster up: $want nodes (head: $HEAD_CPUS CPUs, $WORKER_NODES worker node(s): $WORKER_CPUS CPUs each)
  cluster address (ray.init, ray start --address): $(gcs_address)
  dashboard and Jobs API (ray job submit --address): $(dashboard_address)
  export RAY_ADDRESS=$(dashboard_address)
  stop it with: $0 stop
MSG
}

cmd_stop() {
  local pids=() f pid
  for f in $(node_pid_files); do pids+=("$(cat "$f")"); done
  if [ ${#pids[@]} -eq 0 ]; then
    echo "no nodes started from $STATE_DIR"
    return 0
  fi
  # Worker nodes first, then the head. SIGTERM to `ray start --block` drains its node and stops
  # the node's Ray processes; whatever is left of the node's process group after a while is killed.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[$i]}
    alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + ${RQA_STOP_TIMEOUT_S:-15}))
    while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
    group_alive "$pid" && kill -KILL -- "-$pid" 2>/dev/null || true
  done
  # Ray worker processes run in process groups of their own; they exit when their node's raylet
  # is gone. Any still there after a few seconds are found by their log files open in this
  # cluster's directory, and killed.
  local stragglers deadline=$((SECONDS + 5))
  stragglers=$(ray_processes_of_this_cluster)
  while [ -n "$stragglers" ] && [ $SECONDS -lt $deadline ]; do
    sleep 0.5
    stragglers=$(ray_processes_of_this_cluster)
  done
  if [ -n "$stragglers" ]; then
    echo "killing leftover Ray processes:" $(ps -o pid=,comm= -p "$(echo $stragglers | tr ' ' ',')" 2>/dev/null)
    kill -KILL $stragglers 2>/dev/null || true
  fi
  rm -f "$STATE_DIR"/pids/*.pid
  echo "stopped ${#pids[@]} node(s) started from $STATE_DIR"
}

cmd_status() {
  if [ -z "$(node_pid_files)" ]; then
    echo "no nodes started from $STATE_DIR"
    return 1
  fi
  for f in $(node_pid_files); do
    pid=$(cat "$f")
    if alive "$pid"; then state=running; else state=exited; fi
    echo "$(basename "$f" .pid): pid $pid, $state"
  done
  "$RAY" status --address="$(gcs_address)"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  address) dashboard_address ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
