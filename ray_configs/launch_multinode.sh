#!/usr/bin/env bash
# Multi-node radixserve on Ray. Run each step on the machine it names.
#
#   ray_configs/launch_multinode.sh head   [--port 6379] [--num-cpus N] [--num-gpus G]
#   ray_configs/launch_multinode.sh worker --address HEAD_IP:6379 [--num-cpus N] [--num-gpus G]
#   ray_configs/launch_multinode.sh deploy --address HEAD_IP:6379 [--http-port 8000] [radixserve serve flags...]
#   ray_configs/launch_multinode.sh up     [--workers 1] [--num-cpus 2] [--http-port 8000] [serve flags...]
#                                          # one-machine demo: head + local workers + deploy
#   ray_configs/launch_multinode.sh stop   # idempotent: stops every Ray process on this machine
#   ray_configs/launch_multinode.sh status
#
# deploy waits until GET /health answers 200 (or fails after $HEALTH_TIMEOUT seconds, default 300).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export RAY_AUTH_MODE=token  # Ray's token auth (on by default for `ray start --head`) for every client
PY=${PYTHON:-python3}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-300}

die() { echo "launch_multinode: $*" >&2; exit 2; }

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
  local port=6379 rest=()
  while [ $# -gt 0 ]; do
    case "$1" in --port) port=$2; shift 2 ;; *) rest+=("$1"); shift ;; esac
  done
  # shellcheck disable=SC2046
  ray start --head --port="$port" --include-dashboard=false --disable-usage-stats $(node_flags "${rest[@]:-}")
  echo "head started; workers join with: $0 worker --address <this-node-ip>:$port"
}

cmd_worker() {
  local address="" rest=()
  while [ $# -gt 0 ]; do
    case "$1" in --address) address=$2; shift 2 ;; *) rest+=("$1"); shift ;; esac
  done
  [ -n "$address" ] || die "worker needs --address HEAD_IP:PORT"
  # shellcheck disable=SC2046
  ray start --address="$address" --disable-usage-stats $(node_flags "${rest[@]:-}")
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

cmd_up() {
  local workers=1 cpus=2 http_port=8000 port rest=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --workers) workers=$2; shift 2 ;;
      --num-cpus) cpus=$2; shift 2 ;;
      --http-port) http_port=$2; shift 2 ;;
      *) rest+=("$1"); shift ;;
    esac
  done
  port=$($PY -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')
  cmd_head --port "$port" --num-cpus "$cpus"
  local ip
  ip=$($PY -c 'import ray._private.services as s; print(s.get_node_ip_address())')
  for _ in $(seq "$workers"); do
    cmd_worker --address "$ip:$port" --num-cpus "$cpus"
  done
  cmd_deploy --address "$ip:$port" --http-port "$http_port" "${rest[@]}"
}

cmd_stop() {
  ray stop --force >/dev/null 2>&1 || true
  echo "stopped"
}

case "${1:-}" in
  head) shift; cmd_head "$@" ;;
  worker) shift; cmd_worker "$@" ;;
  deploy) shift; cmd_deploy "$@" ;;
  up) shift; cmd_up "$@" ;;
  stop) cmd_stop ;;
  status) ray status ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
