#!/usr/bin/env bash
# A Ray head on 127.0.0.1 with the dashboard for `ray job submit`: up | down | status.
#
# Every port is a free loopback port, recorded in $RAY_STACK_DIR (default .stack/ray).
# `ray start --block` runs in its own session; `down` stops that session by its ID, so
# it never touches another Ray on this machine (which `ray stop` would).
# Clients: `source $RAY_STACK_DIR/env.sh` sets RAY_ADDRESS to the dashboard URL.
set -Eeuo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
dir="$(mkdir -p "${RAY_STACK_DIR:-$here/.stack/ray}" && cd "${RAY_STACK_DIR:-$here/.stack/ray}" && pwd)"
ray="${RAY_BIN:-$here/.venv/bin/ray}"
[ -x "$ray" ] || { echo "$ray not found: run 'make venv' first" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

alive() { [ -f "$dir/ray.pid" ] && kill -0 "$(cat "$dir/ray.pid")" 2>/dev/null; }

dashboard_ready() { python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/api/version', timeout=3)" "$1"; }

up() {
  if status >/dev/null 2>&1; then status; return 0; fi
  down >/dev/null 2>&1 || true
  # Ray's socket paths must stay under 108 bytes, so its temp dir is short, not in $dir.
  local tmp gcs dash; tmp="$(mktemp -d /tmp/ddray.XXXXXX)"; gcs=$(free_port); dash=$(free_port)
  echo "$tmp" >"$dir/temp_dir"
  # Jobs run `python ...`: with the venv first on PATH that is the project's interpreter.
  PATH="$(dirname "$ray"):$PATH" setsid "$ray" start --head --block --node-ip-address=127.0.0.1 --port="$gcs" \
    --dashboard-host=127.0.0.1 --dashboard-port="$dash" --include-dashboard=true \
    --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
    --runtime-env-agent-port="$(free_port)" --metrics-export-port="$(free_port)" \
    --ray-client-server-port="$(free_port)" --node-manager-port="$(free_port)" \
    --object-manager-port="$(free_port)" --num-cpus="${RAY_NUM_CPUS:-$(nproc)}" \
    --temp-dir="$tmp" --disable-usage-stats >"$dir/ray.log" 2>&1 &
  echo $! >"$dir/ray.pid"
  echo "export RAY_ADDRESS=http://127.0.0.1:$dash" >"$dir/env.sh"
  echo "127.0.0.1:$gcs" >"$dir/gcs_address"
  local deadline=$((SECONDS + 90))
  until dashboard_ready "http://127.0.0.1:$dash" >/dev/null 2>&1; do
    if ! alive || [ $SECONDS -ge $deadline ]; then
      echo "the Ray head did not come up; see $dir/ray.log" >&2; tail -n 20 "$dir/ray.log" >&2; down >&2; exit 1
    fi
    sleep 0.5
  done
  status
}

status() {
  alive || { echo "ray head down (state in $dir)"; return 1; }
  # shellcheck disable=SC1091
  source "$dir/env.sh"
  dashboard_ready "$RAY_ADDRESS" >/dev/null 2>&1 || { echo "ray head starting (pid $(cat "$dir/ray.pid"))"; return 1; }
  echo "ray head up: dashboard $RAY_ADDRESS, GCS $(cat "$dir/gcs_address"), pid $(cat "$dir/ray.pid")"
  echo "clients: source $dir/env.sh   # export RAY_ADDRESS=$RAY_ADDRESS"
}

down() {
  if [ -f "$dir/ray.pid" ]; then
    local pid; pid="$(cat "$dir/ray.pid")"
    # every process of the head's session: raylet, GCS, dashboard, workers
    local members; members="$(ps -eo pid=,sid= | awk -v s="$pid" '$2 == s {print $1}')"
    if [ -n "$members" ]; then
      # shellcheck disable=SC2086
      kill $members 2>/dev/null || true
      for _ in $(seq 50); do
        members="$(ps -eo pid=,sid= | awk -v s="$pid" '$2 == s {print $1}')"
        [ -z "$members" ] && break
        sleep 0.2
      done
      # shellcheck disable=SC2086
      [ -z "$members" ] || kill -9 $members 2>/dev/null || true
    fi
    rm -f "$dir/ray.pid"
  fi
  if [ -f "$dir/temp_dir" ]; then rm -rf "$(cat "$dir/temp_dir")" "$dir/temp_dir"; fi
  echo "ray head down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
