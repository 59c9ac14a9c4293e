# shellcheck shell=bash
# Shared by scripts/slurm/*.sbatch (sourced inside the batch job, on the job's first node).
#
# Reads (all optional): VENV (a virtualenv activated here; its PATH reaches every srun task),
# SRUN_ARGS (extra srun options for every step, e.g. pyxis' --container-image / --container-mounts),
# CONTAINER_CMD (a command prefix, e.g. "apptainer exec --nv image.sif"), HEAD_ADDR.
# STEP_CPUS (CPUs each step's task may use: default the whole node's allocation, which srun does
# not pass on by itself). Sets: NODES (array of the job's node names), HEAD_NODE, HEAD_ADDR.

log() { echo "[slurm $(date +%T)] $*"; }
die() { echo "[slurm $(date +%T)] error: $*" >&2; exit 1; }

require_vars() {  # require_vars NAME...: each must be set and non-empty
  local name
  for name in "$@"; do
    [[ -n ${!name:-} ]] || die "$name is not set: edit the variables at the top of the script or pass $name=... to sbatch"
  done
}

[[ -n ${SLURM_JOB_ID:-} ]] || die "run this script with sbatch (SLURM_JOB_ID is not set)"

if [[ -n ${VENV:-} ]]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate" || die "VENV=$VENV has no bin/activate"
fi

read -r -a SRUN_EXTRA <<<"${SRUN_ARGS:-}"
read -r -a CONTAINER_PREFIX <<<"${CONTAINER_CMD:-}"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${NODES[0]}

node_addr() {  # an address other nodes can reach node $1 at: its name if it resolves, else Slurm's NodeAddr
  if getent hosts "$1" >/dev/null; then
    echo "$1"
  else
    scontrol show node "$1" | grep -oP 'NodeAddr=\K\S+'
  fi
}
HEAD_ADDR=${HEAD_ADDR:-$(node_addr "$HEAD_NODE")}
[[ -n $HEAD_ADDR ]] || die "no address for the head node $HEAD_NODE (set HEAD_ADDR)"

allocated_gpus() {  # GPUs Slurm gave this node (empty when none or unknown)
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
  fi
}

STEP_CPUS=${STEP_CPUS:-${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}}

on_nodes() {  # [STEP_NAME=name] on_nodes NODE,NODE,... COMMAND...: one task per listed node, as a step of this job
  local nodelist=$1 num_nodes; shift
  num_nodes=$(tr ',' '\n' <<<"$nodelist" | wc -l)
  # --overlap: the steps of the RL script (Ray head, workers, driver) share their nodes' CPUs.
  srun --nodes="$num_nodes" --ntasks="$num_nodes" --ntasks-per-node=1 --nodelist="$nodelist" \
    --cpus-per-task="$STEP_CPUS" --overlap --kill-on-bad-exit=1 ${STEP_NAME:+--job-name="$STEP_NAME"} \
    "${SRUN_EXTRA[@]}" "${CONTAINER_PREFIX[@]}" "$@"
}

job_steps_named() {  # job_steps_named NAME: ids (JOB.STEP) of this job's running steps called NAME
  squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' 2>/dev/null | awk -v name="$1" '$2 == name { print $1 }'
}
