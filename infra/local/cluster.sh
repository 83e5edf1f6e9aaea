#!/usr/bin/env bash
# N nodes on this one machine: up | down | status | kill-node I | start-node I   (CLUSTER_NODES, default 2; needs root)
#
# Each node is a network namespace ($prefix"node"I) whose processes run in their own UTS
# namespace with hostname nodeI, at $subnet.(10+I) on eth0. The namespaces are joined by
# a bridge ($prefix"br0", $subnet.1) in this namespace; the subnet exists only there, and
# no route leads anywhere else, so no traffic leaves what this script made.
# On that cluster:
#   - the embedded S3 (SeaweedFS) bound to the bridge address, reachable from every node;
#   - SLURM (infra/local/slurm.sh): slurmctld on the bridge address, one slurmd per node;
#   - Ray: the head on node1, `ray start --address` on the others.
# State lives in $CLUSTER_DIR (default .stack/cluster); clients: `source $CLUSTER_DIR/env.sh`.
# `kill-node I` kills every process inside node I at once (SIGKILL: slurmd, raylet, a
# training rank), as a node that loses power; `start-node I` brings its slurmd and Ray
# node back, once the Ray head has noticed the loss. SLURM marks a silent node DOWN after
# CLUSTER_SLURMD_TIMEOUT seconds (20 here; SLURM's default is 300) and requeues its jobs,
# which may start again CLUSTER_CRED_EXPIRE seconds later (90 here; SLURM's is 120).
# `down` stops every process it started (by PID, then whatever is still inside a node's
# namespace), deletes the namespaces, links and bridge, and removes the state.
# The subnet is CLUSTER_SUBNET (default 10.77.0); where it is already routed on this machine
# (another cluster, a VPN, a container network), `up` takes a random free 10.x.y instead, up
# to 20 tries, says so on stderr, and records the one it took in $CLUSTER_DIR/subnet.
# Exit codes: 0 ok, 2 missing tools, 3 no cluster can be made here: no namespaces, or no
# free subnet (the reason is printed; tests that need the cluster skip with it, and fail
# with it where DD_REQUIRE_CLUSTER=1, as .ci/run sets).
set -Eeuo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
dir="$(mkdir -p "${CLUSTER_DIR:-$here/.stack/cluster}" && cd "${CLUSTER_DIR:-$here/.stack/cluster}" && pwd)"
count="${CLUSTER_NODES:-2}"
prefix="${CLUSTER_PREFIX:-dd}"   # interface names stay under 15 characters
subnet="$(cat "$dir/subnet" 2>/dev/null || echo "${CLUSTER_SUBNET:-10.77.0}")"  # `up` records the one it took
bridge="${prefix}br0"
python="${DD_PYTHON:-$here/.venv/bin/python}"
ray="$(dirname "$python")/ray"

node_ns() { echo "${prefix}node$1"; }
node_addr() { echo "$subnet.$((10 + $1))"; }

can_create_namespaces() {
  for bin in ip nsenter unshare; do
    command -v "$bin" >/dev/null || { echo "missing $bin (Debian: iproute2, util-linux)" >&2; exit 2; }
  done
  [ -x "$python" ] || { echo "$python not found: run 'make venv' first" >&2; exit 2; }
  if [ "$(id -u)" != 0 ] || ! unshare --net true 2>/dev/null; then
    echo "cannot create network namespaces here (needs root and CAP_SYS_ADMIN)" >&2; exit 3
  fi
}

# subnet_taken A.B.C: a route of A.B.C.* exists here. Not `ip route show | grep -q`: grep
# exits at the first match, ip then dies of SIGPIPE, and pipefail makes that "not taken".
subnet_taken() { grep -q "^${1//./\\.}\\." <<<"$(ip route show)"; }

pick_subnet() {  # CLUSTER_SUBNET, or a random free 10.x.y where that one is routed already
  local tries=0 taken
  subnet="${CLUSTER_SUBNET:-10.77.0}"
  while subnet_taken "$subnet"; do
    tries=$((tries + 1))
    if [ "$tries" -gt 20 ]; then
      echo "subnet ${CLUSTER_SUBNET:-10.77.0}.0/24 and 20 random others are already routed on this machine;" \
        "set CLUSTER_SUBNET to a free one" >&2
      exit 3
    fi
    taken=$subnet
    subnet="10.$((100 + RANDOM % 150)).$((RANDOM % 250))"
    echo "subnet $taken.0/24 is already routed on this machine; trying $subnet.0/24" >&2
  done
  echo "$subnet" >"$dir/subnet"
}

make_network() {
  ip link add "$bridge" type bridge
  ip addr add "$subnet.1/24" dev "$bridge"
  ip link set "$bridge" up
  local i
  for i in $(seq "$count"); do
    ip netns add "$(node_ns "$i")"
    ip link add "${prefix}v$i" type veth peer name "${prefix}e$i"
    ip link set "${prefix}e$i" netns "$(node_ns "$i")"
    ip -n "$(node_ns "$i")" link set "${prefix}e$i" name eth0
    ip -n "$(node_ns "$i")" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "$(node_ns "$i")" link set eth0 up
    ip -n "$(node_ns "$i")" link set lo up
    ip link set "${prefix}v$i" master "$bridge" up
  done
}

start_s3() {
  "$python" -m dist_diffusion.cli stack up --root "$dir/s3" --host "$subnet.1" | tail -n +3 >"$dir/s3.env"
}

start_slurm() {
  local spec="" i
  for i in $(seq "$count"); do spec+="node$i=$(node_addr "$i")@$(node_ns "$i") "; done
  SLURM_STACK_DIR="$dir/slurm" SLURM_CTLD_ADDR="$subnet.1" SLURM_NODES="$spec" \
    SLURM_SLURMD_TIMEOUT="${CLUSTER_SLURMD_TIMEOUT:-20}" SLURM_CRED_EXPIRE="${CLUSTER_CRED_EXPIRE:-90}" "$here/infra/local/slurm.sh" up >/dev/null
}

ray_node() {  # ray_node I ARGS...: `ray start --block` on node I in its own session, pid recorded
  local i=$1; shift
  local tmp; tmp="$(mktemp -d /tmp/ddray-n"$i".XXXXXX)"  # socket paths must stay short
  echo "$tmp" >>"$dir/ray_temp_dirs"
  # setsid first, as a plain command: $! is then the session leader, and `down` stops the
  # whole session (raylet, GCS, workers) by its id. GLOO_SOCKET_IFNAME: Ray Train forms the
  # gloo group itself, before our code could bind it. The S3 variables play the part of a
  # cloud node's instance profile.
  local s3vars; mapfile -t s3vars < <(sed -n 's/^export //p' "$dir/s3.env")
  setsid nsenter --net="/var/run/netns/$(node_ns "$i")" unshare --uts sh -c 'hostname "$0"; exec "$@"' "node$i" \
    env "${s3vars[@]}" PATH="$(dirname "$python"):$PATH" GLOO_SOCKET_IFNAME=eth0 \
    "$ray" start --block --node-ip-address="$(node_addr "$i")" --num-cpus=1 --temp-dir="$tmp" \
    --disable-usage-stats "$@" >"$dir/ray-node$i.log" 2>&1 &
  echo $! >"$dir/ray-node$i.pid"
}

start_ray() {
  # each node has its own network namespace, so Ray's default ports never collide
  local head gcs=6379 dash=8265 i; head="$(node_addr 1)"
  ray_node 1 --head --port="$gcs" --dashboard-host="$head" --dashboard-port="$dash" --include-dashboard=true
  echo "export RAY_ADDRESS=http://$head:$dash" >"$dir/ray.env"
  echo "$head:$gcs" >"$dir/ray_gcs"
  wait_for "the Ray head" 120 "$python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=3)" \
    "http://$head:$dash/api/version"
  for i in $(seq 2 "$count"); do ray_node "$i" --address="$head:$gcs"; done
  for i in $(seq "$count"); do wait_for_ray_node "$i"; done
}

ray_node_alive() {  # ray_node_alive I: does the Ray head count a live raylet on node I?
  timeout 10 "$python" -c "import json,sys,urllib.request; n=json.load(urllib.request.urlopen(sys.argv[1], timeout=3)); sys.exit(
0 if any(x['raylet']['state'] == 'ALIVE' and x['ip'] == sys.argv[2] for x in n['data']['summary']) else 1)" \
    "http://$(node_addr 1):8265/nodes?view=summary" "$(node_addr "$1")"
}

wait_for_ray_node() { wait_for "the Ray node on node$1" 120 ray_node_alive "$1"; }

kill_node() {  # kill_node I: SIGKILL to everything inside node I, as when it loses power
  local ns left; ns="$(node_ns "${1:?usage: cluster.sh kill-node I}")"
  ip netns list | grep -qw "$ns" || { echo "no node$1 in this cluster" >&2; return 2; }
  for _ in $(seq 50); do
    left="$(ip netns pids "$ns" | tr '\n' ' ')"
    [ -n "${left// /}" ] || { echo "node$1 lost: every process in it killed"; return 0; }
    # shellcheck disable=SC2086
    kill -9 $left 2>/dev/null || true
    sleep 0.2
  done
  echo "node$1: processes survived SIGKILL: $left" >&2; return 1
}

start_node() {  # start_node I: node I's slurmd and Ray node again, after kill-node
  local i=${1:?usage: cluster.sh start-node I}
  [ "$i" != 1 ] || { echo "node1 holds the Ray head: restart the whole cluster (down, then up)" >&2; return 2; }
  # slurmd first, at once: slurmctld still owes the lost node a signal for the old
  # step (srun's kill of the failed step), retried about a minute after the loss; it
  # must land before the requeued job starts there again and reuses the step's id. SLURM
  # holds a requeued job back cred_expire seconds (90 here), which covers that; whoever
  # lifts that back-off (tests/conftest.py lift_requeue_backoff) first waits for `sdiag`'s agent queue to empty.
  SLURM_STACK_DIR="$dir/slurm" "$here/infra/local/slurm.sh" node-up "node$i" >/dev/null
  # a raylet that comes back before the head has marked its old self dead would be
  # taken for the lost one: wait for the head's health check first
  local deadline=$((SECONDS + 120))
  while ray_node_alive "$i" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "the Ray head still counts node$i alive after 120s: is it lost?" >&2; return 1; }
    sleep 0.5
  done
  ray_node "$i" --address="$(cat "$dir/ray_gcs")"
  wait_for_ray_node "$i"
  echo "node$i back: slurmd and Ray"
}

probe() {  # a command under a 10 s limit; a function of this script (timeout cannot run those) as it is
  if declare -F "$1" >/dev/null; then "$@"; else timeout 10 "$@"; fi
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...
  local what=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until probe "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "$what did not come up in ${limit}s; see $dir" >&2; return 1; }
    sleep 0.5
  done
}

write_env() {
  {
    echo "# source me: SLURM, Ray and S3 of the $count-node cluster on this machine"
    echo "export SLURM_CONF=$dir/slurm/slurm.conf"
    cat "$dir/ray.env" "$dir/s3.env"
    echo "export CLUSTER_NODE_ADDRS='$(for i in $(seq "$count"); do printf '%s ' "$(node_addr "$i")"; done)'"
  } >"$dir/env.sh"
}

up() {
  if status >/dev/null 2>&1; then status; return 0; fi
  can_create_namespaces
  down >/dev/null 2>&1 || true
  pick_subnet
  trap 'echo "cluster failed to start; removing what started" >&2; down >&2' ERR
  echo "$count" >"$dir/count"
  make_network
  start_s3
  start_slurm
  start_ray
  write_env
  trap - ERR
  status
}

status() {
  [ -f "$dir/env.sh" ] || { echo "cluster down (state in $dir)"; return 1; }
  local i
  for i in $(seq "$(cat "$dir/count")"); do
    ip netns list | grep -qw "$(node_ns "$i")" || { echo "cluster: node$i has no namespace"; return 1; }
    kill -0 "$(cat "$dir/ray-node$i.pid" 2>/dev/null)" 2>/dev/null || { echo "cluster: ray on node$i down"; return 1; }
  done
  SLURM_STACK_DIR="$dir/slurm" "$here/infra/local/slurm.sh" status >/dev/null || { echo "cluster: slurm down"; return 1; }
  echo "cluster up: $(cat "$dir/count") nodes on $subnet.0/24 (bridge $bridge); source $dir/env.sh"
}

stop_sessions() {  # TERM the `ray start --block` sessions SID..., KILL what is left after 3 s
  # (a raylet drains for up to 30 s on TERM; nothing of a throwaway cluster needs that)
  local members
  for signal in TERM KILL; do
    members="$(session_members "$@")"
    [ -n "$members" ] || return 0
    # shellcheck disable=SC2086
    kill -s "$signal" $members 2>/dev/null || true
    for _ in $(seq 15); do
      [ -z "$(session_members "$@")" ] && return 0
      sleep 0.2
    done
  done
}

session_members() { ps -eo pid=,sid= | awk -v sids=" $* " 'index(sids, " " $2 " ") {print $1}'; }

down() {
  local n i pidfile ns
  n="$(cat "$dir/count" 2>/dev/null || echo "$count")"
  local sessions=()
  for pidfile in "$dir"/ray-node*.pid; do [ -e "$pidfile" ] && sessions+=("$(cat "$pidfile")"); done
  [ ${#sessions[@]} -eq 0 ] || stop_sessions "${sessions[@]}"
  rm -f "$dir"/ray-node*.pid
  [ -d "$dir/slurm" ] && SLURM_STACK_DIR="$dir/slurm" "$here/infra/local/slurm.sh" down >/dev/null 2>&1 || true
  [ -d "$dir/s3" ] && "$python" -m dist_diffusion.cli stack down --root "$dir/s3" >/dev/null 2>&1 || true
  for i in $(seq "$n"); do
    ns="$(node_ns "$i")"
    ip netns list | grep -qw "$ns" || continue
    # anything still inside the node (a training rank, a slurmstepd): stop it, then the namespace
    local left; left="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
    # shellcheck disable=SC2086
    [ -z "$left" ] || { kill $left 2>/dev/null || true; sleep 1; kill -9 $(ip netns pids "$ns") 2>/dev/null || true; }
    ip netns del "$ns"
  done
  for i in $(seq "$n"); do ip link del "${prefix}v$i" 2>/dev/null || true; done
  ip link del "$bridge" 2>/dev/null || true
  if [ -f "$dir/ray_temp_dirs" ]; then xargs rm -rf <"$dir/ray_temp_dirs"; fi
  rm -f "$dir/ray_temp_dirs" "$dir/env.sh" "$dir/ray.env" "$dir/s3.env" "$dir/ray_gcs" "$dir/count" "$dir/subnet"
  echo "cluster down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  kill-node) kill_node "${2:-}" ;;
  start-node) start_node "${2:-}" ;;
  *) echo "usage: $0 up|down|status|kill-node I|start-node I" >&2; exit 2 ;;
esac
