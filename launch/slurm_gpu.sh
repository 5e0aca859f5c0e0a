#!/usr/bin/env bash
# Multi-node GPU training with SLURM: writes a batch script that starts one main.py process per
# node (each owning all of the node's GPUs) with srun, and submits it with sbatch.
#
#   launch/slurm_gpu.sh [options] [-- main.py overrides]
#
# Required (flag or environment variable):
#   --partition     MD4_PARTITION      SLURM partition
#   --nodes         MD4_NODES          number of nodes
#   --gpus-per-node MD4_GPUS_PER_NODE  GPUs per node (e.g. 8 for 8xH100)
# Optional:
#   --account       MD4_ACCOUNT        SLURM account
#   --time          MD4_TIME           wall-clock limit (default 24:00:00)
#   --job-name      MD4_JOB_NAME       (default md4)
#   --config        MD4_CONFIG         experiment config (default configs/owt.py)
#   --workdir       MD4_WORKDIR        run directory on a filesystem shared by all nodes
#                                      (default runs/JOB_NAME in this checkout)
#   --python        MD4_PYTHON         interpreter with jax[cuda12] installed (default .venv/bin/python)
#   --dry-run                          print the batch script and the sbatch command only
#
# Inside the job: JAX_COORDINATOR_ADDRESS = first node of the allocation : port derived from the
# job id, JAX_NUM_PROCESSES = SLURM_NTASKS, JAX_PROCESS_ID = SLURM_PROCID (set per task by srun).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PARTITION="${MD4_PARTITION:-}"
NODES="${MD4_NODES:-}"
GPUS_PER_NODE="${MD4_GPUS_PER_NODE:-}"
ACCOUNT="${MD4_ACCOUNT:-}"
TIME="${MD4_TIME:-24:00:00}"
JOB_NAME="${MD4_JOB_NAME:-md4}"
CONFIG="${MD4_CONFIG:-configs/owt.py}"
WORKDIR="${MD4_WORKDIR:-}"
PYTHON="${MD4_PYTHON:-$ROOT/.venv/bin/python}"
DRY_RUN=0
OVERRIDES=()

while (($#)); do
  case "$1" in
    --partition) PARTITION="${2:?--partition needs a value}"; shift 2 ;;
    --nodes) NODES="${2:?--nodes needs a value}"; shift 2 ;;
    --gpus-per-node) GPUS_PER_NODE="${2:?--gpus-per-node needs a value}"; shift 2 ;;
    --account) ACCOUNT="${2:?--account needs a value}"; shift 2 ;;
    --time) TIME="${2:?--time needs a value}"; shift 2 ;;
    --job-name) JOB_NAME="${2:?--job-name needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n "$PARTITION" ]] || die "missing setting --partition (or environment variable MD4_PARTITION)"
[[ -n "$NODES" ]] || die "missing setting --nodes (or environment variable MD4_NODES)"
[[ -n "$GPUS_PER_NODE" ]] || die "missing setting --gpus-per-node (or environment variable MD4_GPUS_PER_NODE)"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS_PER_NODE'"
WORKDIR="${WORKDIR:-$ROOT/runs/$JOB_NAME}"

batch_script() {
  local account="" main
  [[ -z "$ACCOUNT" ]] || account="#SBATCH --account=$ACCOUNT"
  main="$(printf '%q ' "$PYTHON" main.py --config="$CONFIG" --workdir="$WORKDIR" \
    --distributed=on "${OVERRIDES[@]}")"
  cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --partition=$PARTITION
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --cpus-per-task=$((GPUS_PER_NODE * 4))
#SBATCH --time=$TIME
#SBATCH --output=$WORKDIR/slurm-%j.out
${account}
set -euo pipefail
head_node="\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)"
export JAX_COORDINATOR_ADDRESS="\$head_node:\$((20000 + SLURM_JOB_ID % 20000))"
export JAX_NUM_PROCESSES="\$SLURM_NTASKS"
cd $(printf '%q' "$ROOT")
# JAX_PROCESS_ID must be each task's own rank, so it is set inside the task.
# shellcheck disable=SC2016
srun --nodes=$NODES --ntasks=$NODES --ntasks-per-node=1 --gpus-per-node=$GPUS_PER_NODE --kill-on-bad-exit=1 \\
  bash -c 'export JAX_PROCESS_ID="\$SLURM_PROCID"; exec "\$@"' md4 ${main% }
EOF
}

script="$WORKDIR/md4-$JOB_NAME.sbatch"
if ((DRY_RUN)); then
  echo "# ---- $script ----"
  batch_script
  echo "# ---- then: ----"
  printf 'mkdir -p %q\nsbatch %q\n' "$WORKDIR" "$script"
  exit 0
fi
mkdir -p "$WORKDIR"
batch_script > "$script"
sbatch "$script"
