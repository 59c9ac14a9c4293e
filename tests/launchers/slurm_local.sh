#!/usr/bin/env bash
# A Slurm "cluster" of N logical nodes on this one host, for the tests of scripts/slurm/ (and for
# trying those scripts before a real cluster). Debian / Ubuntu, root, no systemd needed.
#
#   tests/launchers/slurm_local.sh start    # idempotent; prints shell lines for eval:
#                                           #   export SLURM_CONF=...; export SLURM_LOCAL_STARTED=0|1
#   tests/launchers/slurm_local.sh stop     # ends only the daemons this script started (PID files)
#   tests/launchers/slurm_local.sh status
#   tests/launchers/slurm_local.sh env      # the SLURM_CONF export line only
#
#   eval "$(tests/launchers/slurm_local.sh start)"
#   timeout 300 sbatch --wait -o out.txt scripts/slurm/train_offline.sbatch ...
#
# Isolated from anything else on the machine: everything (config, state, logs, PID files, and
# a private munged with its own key and socket) lives under $SLURM_LOCAL_DIR, nothing is written
# to /etc, and the ports are this script's own, so another local Slurm or munged keeps running.
# Clients need SLURM_CONF (jobs inherit it). Nodes n1..nN share the host: Debian builds
# slurmd with multiple-slurmd support (`slurmd -N n1`), each node has its own port and spool.
#
# Environment: SLURM_LOCAL_DIR (/tmp/mrlhf-slurm), SLURM_LOCAL_NODES (2), SLURM_LOCAL_CPUS (nproc,
# per node), SLURM_LOCAL_CTL_PORT (16827; nodes take the next ports).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/mrlhf-slurm}
NUM_NODES=${SLURM_LOCAL_NODES:-2}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
CTL_PORT=${SLURM_LOCAL_CTL_PORT:-16827}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/socket
export SLURM_CONF=$CONF

log() { echo "[slurm-local $(date +%T)] $*" >&2; }
die() { log "$*"; exit 1; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_names() { local i; for ((i = 1; i <= NUM_NODES; i++)); do echo "n$i"; done; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  command -v apt-get >/dev/null || die "slurm-wlm / munge are not installed and apt-get is unavailable"
  log "installing slurm-wlm munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
}

start_munged() {
  # munged insists on: a key readable by its user only, a socket directory everyone may enter,
  # and running as a non-root user (Debian's `munge`).
  install -d -o munge -g munge -m 0755 "$DIR/munge"
  install -d -o munge -g munge -m 0700 "$DIR/munge/private"
  local key=$DIR/munge/private/munge.key
  if [[ ! -s $key ]]; then
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    chown munge:munge "$key"; chmod 0400 "$key"
  fi
  alive "$DIR/munged.pid" && return
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$key" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/private/munged.log" --seed-file="$DIR/munge/private/munged.seed"
  local _
  for _ in $(seq 100); do
    munge -S "$MUNGE_SOCKET" -n </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && break
    sleep 0.05
  done
  cp "$DIR/munge/munged.pid" "$DIR/munged.pid"
  STARTED=1
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/log"
  local i port
  {
    cat <<EOF
# written by tests/launchers/slurm_local.sh
ClusterName=mrlhf-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTL_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
# sbatch --wait polls every 2 s only while MinJobAge/2 <= 2 (else 2 s, 8 s, 32 s, ...: a 7 s job
# returns after ~42 s). Finished jobs then leave squeue after ~5 s: read results from -o files.
MinJobAge=5
EOF
    for ((i = 1; i <= NUM_NODES; i++)); do
      port=$((CTL_PORT + i))
      echo "NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=2000 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
  } >"$CONF.new"
  if [[ -f $CONF ]] && ! cmp -s "$CONF" "$CONF.new"; then
    log "configuration changed: restarting the daemons"
    stop_slurm_daemons
  fi
  mv "$CONF.new" "$CONF"
}

start_slurm_daemons() {
  local node
  if ! alive "$DIR/slurmctld.pid"; then
    slurmctld -c  # -c: forget jobs and node states of an earlier run; daemonizes, writes its PID file
    STARTED=1
  fi
  for node in $(node_names); do
    mkdir -p "$DIR/spool-$node"
    alive "$DIR/slurmd-$node.pid" && continue
    slurmd -N "$node"
    STARTED=1
  done
  local t0=$SECONDS
  until [[ $(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)$') -ge $NUM_NODES ]]; do
    ((SECONDS - t0 < 60)) || { sinfo -N -l >&2 || true; die "nodes not idle after 60 s; see $DIR/log"; }
    # a node drained by an earlier job (e.g. "Kill task failed") stays out until resumed
    for node in $(sinfo -h -N -t drain -o '%N' 2>/dev/null); do scontrol update nodename="$node" state=resume; done
    sleep 0.2
  done
  log "up: $(sinfo -h -N -o '%N:%T' | paste -sd' ')"
}

terminate() {  # terminate PID_FILE...: TERM the recorded daemons at once (each takes ~2 s), KILL after 10 s
  local file pid pids=() _
  for file in "$@"; do
    [[ -s $file ]] || continue
    pid=$(cat "$file"); rm -f "$file"
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
stop_slurm_daemons() { terminate "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; }

[[ $(id -u) == 0 ]] || [[ ${1:-} == env ]] || die "must run as root (slurmd and munged's setup need it)"
case ${1:-} in
  start)
    STARTED=0
    mkdir -p "$DIR"
    install_packages
    start_munged
    write_conf
    start_slurm_daemons
    echo "export SLURM_CONF=$CONF"
    echo "export SLURM_LOCAL_STARTED=$STARTED" ;;
  stop)
    terminate "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"
    log "stopped" ;;
  status) sinfo -N -l; squeue ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start | stop | status | env" >&2; exit 2 ;;
esac
