#!/usr/bin/env bash
# Multi-node radixserve on Ray. Run each step on the machine it names.
#
#   ray_configs/launch_multinode.sh head   [--port 6379] [--dashboard-port 8265] [--num-cpus N] [--num-gpus G]
#   ray_configs/launch_multinode.sh worker --address HEAD_IP:6379 [--num-cpus N] [--num-gpus G]
#   ray_configs/launch_multinode.sh deploy --address HEAD_IP:6379 [--http-port 8000] [radixserve serve flags...]
#   ray_configs/launch_multinode.sh up     [--workers 1] [--num-cpus 2] [--http-port 8000] [serve flags...]
#                                          # one-machine demo: head + local workers + deploy
#   ray_configs/launch_multinode.sh stop   # idempotent: stops the Ray processes this script started here
#   ray_configs/launch_multinode.sh status
#
# Every Ray process the script starts lives under one temp dir ($RAY_TEMP_DIR, default
# /tmp/radixserve-ray), and `stop` ends exactly the processes whose command line names it:
# never other Ray clusters on the machine. The head runs Ray's dashboard on 127.0.0.1, so
# `ray job submit --address http://127.0.0.1:8265` and `serve status` work on the head.
# deploy waits until GET /health answers 200 (or fails after $HEALTH_TIMEOUT seconds, default 300).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export RAY_AUTH_MODE=token  # Ray's token auth (on by default for `ray start --head`) for every client
PY=${PYTHON:-python3}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-300}
RAY_TEMP_DIR=${RAY_TEMP_DIR:-/tmp/radixserve-ray}  # short: Ray's socket paths must fit in 107 bytes

die() { echo "launch_multinode: $*" >&2; exit 2; }
ray_cli() { "$PY" -m ray.scripts.scripts "$@"; }  # the `ray` CLI of $PY's environment, whatever is on PATH

node_flags() {  # --num-cpus/--num-gpus passthrough
  local out=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --num-cpus|--num-gpus) out+=("$1=$2"); shift 2 ;;
      *) die "unknown flag $1" ;;
    esac
  done
  echo "${out[@]:-}"
}

cmd_head() {
  local port=6379 dash_port=8265 rest=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) port=$2; shift 2 ;;
      --dashboard-port) dash_port=$2; shift 2 ;;
      *) rest+=("$1"); shift ;;
    esac
  done
  # shellcheck disable=SC2046
  ray_cli start --head --port="$port" --temp-dir="$RAY_TEMP_DIR" --include-dashboard=true \
    --dashboard-host=127.0.0.1 --dashboard-port="$dash_port" --disable-usage-stats $(node_flags "${rest[@]:-}")
  echo "head started; workers join with: $0 worker --address <this-node-ip>:$port"
  echo "jobs: ray job submit --address http://127.0.0.1:$dash_port --working-dir . -- python -m radixserve.cluster.batch ..."
}

cmd_worker() {
  local address="" rest=()
  while [ $# -gt 0 ]; do
    case "$1" in --address) address=$2; shift 2 ;; *) rest+=("$1"); shift ;; esac
  done
  [ -n "$address" ] || die "worker needs --address HEAD_IP:PORT"
  # shellcheck disable=SC2046
  ray_cli start --address="$address" --disable-usage-stats $(node_flags "${rest[@]:-}")
}

wait_healthy() {
  local url=$1
  $PY - "$url" "$HEALTH_TIMEOUT" <<'PYEOF'
import sys, time, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2])
deadline = time.time() + timeout
while time.time() < deadline:
    try:
        if urllib.request.urlopen(url, timeout=5).status == 200:
            print(f"healthy: {url}")
            sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit(f"not healthy after {timeout:.0f}s: {url}")
PYEOF
}

cmd_deploy() {
  local address="" http_port=8000 rest=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --address) address=$2; shift 2 ;;
      --http-port) http_port=$2; shift 2 ;;
      *) rest+=("$1"); shift ;;
    esac
  done
  [ -n "$address" ] || die "deploy needs --address HEAD_IP:PORT"
  $PY -m radixserve.cluster.serve_cli --ray-address "$address" --port "$http_port" --detach "${rest[@]}"
  wait_healthy "http://127.0.0.1:$http_port/health"
}

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cmd_up() {
  local workers=1 cpus=2 http_port=8000 dash_port="" port rest=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --workers) workers=$2; shift 2 ;;
      --num-cpus) cpus=$2; shift 2 ;;
      --http-port) http_port=$2; shift 2 ;;
      --dashboard-port) dash_port=$2; shift 2 ;;
      *) rest+=("$1"); shift ;;
    esac
  done
  port=$(free_port)
  cmd_head --port "$port" --dashboard-port "${dash_port:-$(free_port)}" --num-cpus "$cpus"
  local ip
  ip=$($PY -c 'import ray._private.services as s; print(s.get_node_ip_address())')
  for _ in $(seq "$workers"); do
    cmd_worker --address "$ip:$port" --num-cpus "$cpus"
  done
  echo "cluster address: $ip:$port"
  cmd_deploy --address "$ip:$port" --http-port "$http_port" "${rest[@]}"
}

mine() { pgrep -f -- "$RAY_TEMP_DIR/" || true; }  # PIDs of processes under our temp dir

cmd_stop() {
  local pids
  pids=$(mine)
  [ -z "$pids" ] || kill $pids 2>/dev/null || true
  for _ in $(seq 40); do [ -z "$(mine)" ] && break; sleep 0.25; done
  pids=$(mine)
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  echo "stopped"
}

case "${1:-}" in
  head) shift; cmd_head "$@" ;;
  worker) shift; cmd_worker "$@" ;;
  deploy) shift; cmd_deploy "$@" ;;
  up) shift; cmd_up "$@" ;;
  stop) cmd_stop ;;
  status) ray_cli status ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
