#!/usr/bin/env bash
# A SLURM cluster on this machine: up | down | status.
#
# Real daemons from Debian's slurm-wlm: a private munged, a private MariaDB (bound to
# 127.0.0.1) behind slurmdbd so `sacct` and submitit see job states, slurmctld and
# slurmd, all on free ports. State lives in $SLURM_STACK_DIR (default .stack/slurm).
# `up` is idempotent; `down` stops only the PIDs `up` recorded.
# Clients find the cluster through SLURM_CONF: `source $SLURM_STACK_DIR/env.sh`.
#
# One node on loopback by default. infra/local/cluster.sh sets SLURM_CTLD_ADDR (the
# bridge address slurmctld listens on) and SLURM_NODES ("node1=ADDR@NETNS ..."): then
# one slurmd per node runs inside that node's network and UTS namespace, as nodeN.
# `node-up NAME` starts a lost node's slurmd again. SLURM_SLURMD_TIMEOUT (seconds,
# SLURM's default 300) is how long a silent node stays up before SLURM marks it DOWN
# and requeues its jobs; a requeued job waits SLURM_CRED_EXPIRE seconds (default 120)
# before it may start again. SLURM_SLURMD_DEBUG sets slurmd's log level (info).
# The scheduler looks at pending jobs every second (SLURM's defaults: 60 s for the main
# loop, 30 s for backfill), so a job whose begin time has come starts at once.
# SLURM_TASK_PLUGIN (default task/none) picks how slurmd places tasks: task/affinity binds
# each task to its --cpus-per-task cores (TaskPluginParam=Cores), as production clusters do.
set -Eeuo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
dir="$(mkdir -p "${SLURM_STACK_DIR:-$here/.stack/slurm}" && cd "${SLURM_STACK_DIR:-$here/.stack/slurm}" && pwd)"
pids="$dir/pids"
cluster=dd
hostname_="$(hostname)"
ctld_addr="${SLURM_CTLD_ADDR:-127.0.0.1}"
nodes="${SLURM_NODES-$(cat "$dir/nodes" 2>/dev/null || true)}"  # empty: this machine is the one node

need() {
  local missing=()
  for bin in munged slurmctld slurmd slurmdbd sbatch mariadbd mariadb-install-db; do
    command -v "$bin" >/dev/null || missing+=("$bin")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing ${missing[*]}: run 'make system-deps' (apt-get install slurmctld slurmd" \
         "slurm-client slurmdbd munge mariadb-server)" >&2
    exit 2
  fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

alive() {  # a killed daemon whose parent never reaps it stays a zombie: not alive
  local pid; pid="$(cat "$pids/$1.pid" 2>/dev/null)" || return 1
  kill -0 "$pid" 2>/dev/null && [[ "$(ps -o stat= -p "$pid")" != Z* ]]
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...: poll until COMMAND succeeds
  local what=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  while [ $SECONDS -lt $deadline ]; do timeout 5 "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "$what did not become ready in ${limit}s; see $dir/log" >&2
  return 1
}

write_configs() {
  # munged refuses a socket directory that others can write or that it cannot reach,
  # and pytest's tmp dirs are private to root: the socket lives in its own /tmp dir.
  local munge_dir; munge_dir="$(mktemp -d /tmp/dd-munge.XXXXXX)"
  chown munge:munge "$munge_dir"; chmod 755 "$munge_dir"
  local db_port dbd_port ctl_port d_port node
  db_port=$(free_port); dbd_port=$(free_port); ctl_port=$(free_port); d_port=$(free_port)
  node="$(node_lines)"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$pids"
  echo "$nodes" >"$dir/nodes"  # status and down find the same nodes without the variable
  cat >"$dir/ports.env" <<EOF
MUNGE_DIR=$munge_dir
DB_PORT=$db_port
EOF
  cat >"$dir/slurm.conf" <<EOF
ClusterName=$cluster
SlurmctldHost=$hostname_($ctld_addr)
SlurmctldPort=$ctl_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$munge_dir/munge.socket,cred_expire=${SLURM_CRED_EXPIRE:-120}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=${SLURM_TASK_PLUGIN:-task/none}
$(task_plugin_param)
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
KillWait=5
SlurmdTimeout=${SLURM_SLURMD_TIMEOUT:-300}
SlurmdDebug=${SLURM_SLURMD_DEBUG:-info}
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
MinJobAge=600
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$munge_dir/munge.socket
JobAcctGatherType=jobacct_gather/none
$node
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$munge_dir/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
LogFile=$dir/log/slurmdbd.log
PidFile=$dir/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$dir/slurmdbd.conf"
  echo "export SLURM_CONF=$dir/slurm.conf" >"$dir/env.sh"
}

task_plugin_param() {  # cores, not threads: a rank owns whole cores, like its GPU
  [ "${SLURM_TASK_PLUGIN:-task/none}" = task/none ] || echo "TaskPluginParam=Cores"
}

node_lines() {  # this machine as one node, or one line per namespace node (1 CPU each)
  if [ -z "$nodes" ]; then
    echo "$(slurmd -C | head -1 | sed 's/ UpTime.*//') NodeAddr=127.0.0.1 State=UNKNOWN"
    return
  fi
  local spec
  for spec in $nodes; do
    local name="${spec%%=*}" rest="${spec#*=}"
    echo "NodeName=$name NodeAddr=${rest%@*} CPUs=1 State=UNKNOWN"
  done
}

node_names() {
  if [ -z "$nodes" ]; then slurmd -C | head -1 | sed 's/^NodeName=\([^ ]*\).*/\1/'; return; fi
  local spec; for spec in $nodes; do echo "${spec%%=*}"; done
}

start_slurmd() {  # start_slurmd NAME [NETNS]: in that namespace with that hostname
  local name=$1 netns=${2:-}
  if [ -n "$netns" ]; then
    # nsenter, not `ip netns exec`: that remounts /sys, and slurmd then finds no cgroup fs
    nsenter --net="/var/run/netns/$netns" unshare --uts sh -c "hostname $name; exec slurmd -f '$dir/slurm.conf' -N $name"
  else
    slurmd -f "$dir/slurm.conf" -N "$name"
  fi
  wait_for "slurmd $name" 30 test -s "$dir/slurmd-$name.pid"
  cp "$dir/slurmd-$name.pid" "$pids/slurmd-$name.pid"
}

start_munge() {
  # shellcheck disable=SC1091
  source "$dir/ports.env"
  runuser -u munge -- munged --num-threads=10 --socket="$MUNGE_DIR/munge.socket" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
  wait_for munged 10 test -s "$MUNGE_DIR/munged.pid"
  cp "$MUNGE_DIR/munged.pid" "$pids/munged.pid"
}

start_mariadb() {
  source "$dir/ports.env"
  if [ ! -d "$dir/mysql/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$dir/mysql" --user=root \
      --auth-root-authentication-method=normal --skip-test-db >"$dir/log/mariadb-install.log" 2>&1
  fi
  mariadbd --no-defaults --datadir="$dir/mysql" --socket="$dir/mysql.sock" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --user=root --skip-name-resolve --pid-file="$dir/mariadb.pid" \
    --log-error="$dir/log/mariadb.log" 2>>"$dir/log/mariadb.log" &
  echo $! >"$pids/mariadbd.pid"
  wait_for mariadb 60 mariadb-admin --no-defaults --socket="$dir/mysql.sock" ping
}

start_slurm() {
  export SLURM_CONF="$dir/slurm.conf"
  slurmdbd  # reads slurmdbd.conf from SLURM_CONF's directory
  wait_for slurmdbd 30 sacctmgr -n list cluster
  sacctmgr -i add cluster "$cluster" >/dev/null 2>&1 || true
  cp "$dir/slurmdbd.pid" "$pids/slurmdbd.pid"
  slurmctld -f "$dir/slurm.conf"
  wait_for slurmctld 30 scontrol ping
  cp "$dir/slurmctld.pid" "$pids/slurmctld.pid"
  local spec
  if [ -z "$nodes" ]; then
    start_slurmd "$(node_names)"
  else
    for spec in $nodes; do start_slurmd "${spec%%=*}" "${spec##*@}"; done
  fi
  wait_for "every node idle" 30 bash -c '[ -z "$(sinfo -h -N -o %t | grep -vx idle)" ]'
}

node_up() {  # node_up NAME: start that node's slurmd again (after its node was lost)
  local name=${1:?usage: slurm.sh node-up NAME} spec
  alive "slurmd-$name" && return 0
  rm -f "$dir/slurmd-$name.pid" "$pids/slurmd-$name.pid"
  export SLURM_CONF="$dir/slurm.conf"
  for spec in ${nodes:-$(node_names)}; do
    [ "${spec%%=*}" = "$name" ] || continue
    if [ "$spec" = "$name" ]; then start_slurmd "$name"; else start_slurmd "$name" "${spec##*@}"; fi
    wait_for "$name back in service" 60 bash -c "sinfo -h -n $name -o %t | grep -qxE 'idle|alloc|mix|comp'"
    return 0
  done
  echo "no node $name in $dir/nodes" >&2; return 2
}

up() {
  need
  if status >/dev/null 2>&1; then status; return 0; fi
  down >/dev/null 2>&1 || true
  trap 'echo "slurm stack failed to start; stopping what started" >&2; down >&2' ERR
  write_configs
  start_munge
  start_mariadb
  start_slurm
  trap - ERR
  status
}

status() {
  for daemon in munged mariadbd slurmdbd slurmctld $(node_names | sed 's/^/slurmd-/'); do
    alive "$daemon" || { echo "slurm stack: $daemon not running (state in $dir)"; return 1; }
  done
  SLURM_CONF="$dir/slurm.conf" sinfo -h -o "partition %P: %D node(s), %t" | sed 's/^/slurm stack up: /'
  echo "clients: source $dir/env.sh   # export SLURM_CONF=$dir/slurm.conf"
}

stop_pids() {  # stop_pids NAME...: TERM them all at once, KILL whatever has not gone in 10 s
  local name pid live=()
  for name in "$@"; do
    pid="$(cat "$pids/$name.pid" 2>/dev/null)" || continue
    kill "$pid" 2>/dev/null && live+=("$pid")
    rm -f "$pids/$name.pid"
  done
  for _ in $(seq 50); do
    local left=()
    for pid in "${live[@]}"; do kill -0 "$pid" 2>/dev/null && [[ "$(ps -o stat= -p "$pid")" != Z* ]] && left+=("$pid"); done
    [ ${#left[@]} -gt 0 ] || return 0
    live=("${left[@]}")
    sleep 0.2
  done
  kill -9 "${live[@]}" 2>/dev/null || true
}

cancel_jobs() {  # let steps end through slurmd, so none outlive it
  alive slurmctld || return 0
  export SLURM_CONF="$dir/slurm.conf"
  local jobs; jobs="$(timeout 10 squeue -h -o %i 2>/dev/null || true)"
  [ -n "$jobs" ] || return 0
  # shellcheck disable=SC2086
  timeout 10 scancel $jobs 2>/dev/null || true
  wait_for "jobs to end" 30 bash -c '[ -z "$(squeue -h -o %i)" ]' || true
}

kill_orphan_steps() {  # a slurmstepd still holding our spool dir (its slurmd is gone)
  local pid
  for pid in $(pgrep -x slurmstepd || true); do
    if ls -l "/proc/$pid/fd" 2>/dev/null | grep -q "$dir/"; then kill -9 "$pid" 2>/dev/null || true; fi
  done
}

down() {
  cancel_jobs
  # the SLURM daemons first, then what they report to and authenticate with
  stop_pids slurmctld $(for f in "$pids"/slurmd-*.pid; do [ -e "$f" ] && basename "$f" .pid; done)
  stop_pids slurmdbd
  stop_pids mariadbd munged
  kill_orphan_steps
  if [ -f "$dir/ports.env" ]; then source "$dir/ports.env"; rm -rf "$MUNGE_DIR"; fi
  echo "slurm stack down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  node-up) node_up "${2:-}" ;;
  *) echo "usage: $0 up|down|status|node-up NAME" >&2; exit 2 ;;
esac
