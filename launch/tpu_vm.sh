#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, install the project on every worker, start the
# same training command on all workers, stream the logs, delete it.
#
#   launch/tpu_vm.sh [options] create|install|train|logs|delete|all [-- main.py overrides]
#
# Required (flag or environment variable):
#   --project  MD4_PROJECT           Google Cloud project
#   --zone     MD4_ZONE              e.g. us-central2-b (v4), us-west4-a (v5e)
#   --accelerator-type MD4_ACCELERATOR_TYPE   e.g. v4-32, v5litepod-16 (create, all)
#   --bucket   MD4_BUCKET            GCS bucket (no gs://) holding data/owt and the run directories
#                                    (install, train, all)
# Optional:
#   --name     MD4_TPU_NAME          TPU name (default md4-tpu)
#   --version  MD4_RUNTIME_VERSION   TPU software version (default chosen from the accelerator type)
#   --config   MD4_CONFIG            experiment config (default configs/owt.py)
#   --run      MD4_RUN               run name; workdir = gs://BUCKET/runs/RUN (default NAME)
#   --gcsfuse  MD4_GCSFUSE=1         install: also mount the bucket at ~/gcs on every worker (gcsfuse),
#                                    for tools that want local paths; training does not need it
#   --spot                           request a Spot slice
#   --dry-run                        print the commands instead of running them
#
# The run directory is the bucket itself: Orbax writes every worker's checkpoint shards to
# gs://BUCKET/runs/RUN directly, process 0 the metrics, samples and config (through etils.epath
# with gcsfs; google-cloud-storage for Orbax's bucket queries). TensorBoard reads the event files
# from there: tensorboard --logdir gs://BUCKET/runs/RUN/tensorboard (with gcsfs installed).
# The OWT shards are copied to each worker's disk.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROJECT="${MD4_PROJECT:-}"
ZONE="${MD4_ZONE:-}"
ACCELERATOR_TYPE="${MD4_ACCELERATOR_TYPE:-}"
BUCKET="${MD4_BUCKET:-}"
NAME="${MD4_TPU_NAME:-md4-tpu}"
VERSION="${MD4_RUNTIME_VERSION:-}"
CONFIG="${MD4_CONFIG:-configs/owt.py}"
RUN="${MD4_RUN:-}"
GCSFUSE="${MD4_GCSFUSE:-0}"
SPOT=0
DRY_RUN=0
COMMAND=""
OVERRIDES=()

while (($#)); do
  case "$1" in
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator-type) ACCELERATOR_TYPE="${2:?--accelerator-type needs a value}"; shift 2 ;;
    --bucket) BUCKET="${2:?--bucket needs a value}"; shift 2 ;;
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --run) RUN="${2:?--run needs a value}"; shift 2 ;;
    --gcsfuse) GCSFUSE=1; shift ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    create|install|train|logs|delete|all)
      [[ -z "$COMMAND" ]] || die "only one subcommand, got '$COMMAND' and '$1'"
      COMMAND="$1"; shift ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$COMMAND" ]] || die "missing subcommand: create|install|train|logs|delete|all (see --help)"
BUCKET="${BUCKET#gs://}"
RUN="${RUN:-$NAME}"
for value in "$NAME" "$RUN" "$BUCKET"; do  # they go into remote shell commands unquoted
  [[ "$value" =~ ^[A-Za-z0-9._-]*$ ]] || die "names may use only letters, digits, '.', '_', '-': '$value'"
done

require() {  # require VALUE FLAG ENV
  [[ -n "$1" ]] || die "missing setting $2 (or environment variable $3), needed by '$COMMAND'"
}
require "$PROJECT" --project MD4_PROJECT
require "$ZONE" --zone MD4_ZONE
case "$COMMAND" in
  create|all) require "$ACCELERATOR_TYPE" --accelerator-type MD4_ACCELERATOR_TYPE ;;
esac
case "$COMMAND" in
  install|train|all) require "$BUCKET" --bucket MD4_BUCKET ;;
esac

if [[ -z "$VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) VERSION="tpu-ubuntu2204-base" ;;
  esac
fi

run() {  # prints the command (dry run) or runs it
  if ((DRY_RUN)); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--project="$PROJECT" --zone="$ZONE")
WORKDIR="gs://$BUCKET/runs/$RUN"
# Single quotes on purpose: $HOME is expanded on the workers, not here.
# shellcheck disable=SC2016
MOUNT='$HOME/gcs'
# shellcheck disable=SC2016
LOG='$HOME/md4-train.log'
# shellcheck disable=SC2016
PID='$HOME/md4-train.pid'

on_workers() {  # on_workers WORKER COMMAND: runs a shell command on the given worker(s)
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

create() {
  local extra=()
  ((SPOT)) && extra=(--spot)
  run "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$VERSION" "${extra[@]}"
}

install() {
  local archive="/tmp/md4-src-$NAME.tar.gz" mount=""
  ((GCSFUSE)) && mount="
if ! command -v gcsfuse >/dev/null; then
  echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
mkdir -p $MOUNT && (mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT)"
  run tar -czf "$archive" -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./runs \
    --exclude=./data/owt .
  run "${TPU[@]}" scp "$archive" "$NAME:md4-src.tar.gz" "${WHERE[@]}" --worker=all
  on_workers all "set -e; mkdir -p \$HOME/md4 && tar -xzf \$HOME/md4-src.tar.gz -C \$HOME/md4
cd \$HOME/md4 && python3 -m venv .venv && .venv/bin/pip install -q -U pip
.venv/bin/pip install -q 'jax[tpu]' gcsfs google-cloud-storage -r requirements.txt
ldconfig -p | grep -q libtcmalloc || sudo apt-get install -y -q libtcmalloc-minimal4 || true$mount
mkdir -p data/owt && gcloud storage cp -r 'gs://$BUCKET/data/owt/*' data/owt/"
}

# libtpu flags that overlap communication with compute (the step is GSPMD-partitioned, so FSDP's
# weight all-gathers and the gradient reduce-scatters are XLA collectives):
#   latency_hiding_scheduler   schedules each collective early enough to hide it behind matmuls
#   async_collective_fusion*   runs all-gathers / reduce-scatters asynchronously, fused with the
#                              compute that produces or consumes them, across loop steps too
#   overlap_compute_collective_tc  lets the TensorCore compute while collectives are in flight
#   data_parallel_all_reduce_opt / enable_async_all_reduce  asynchronous gradient all-reduces
# A user's LIBTPU_INIT_ARGS on the worker comes after them (later flags win).
TPU_FLAGS="--xla_tpu_enable_latency_hiding_scheduler=true \
--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true \
--xla_enable_async_all_reduce=true"

train() {
  local args=(--config="$CONFIG" --distributed=on "${OVERRIDES[@]}")
  local quoted
  quoted="$(printf '%q ' "${args[@]}")"
  # The same command on every worker; JAX finds the slice's workers from the TPU metadata.
  # Checkpoints are saved asynchronously (Orbax, md4/training/checkpoints.py): the step goes on
  # while each worker writes its shards.
  on_workers all "cd \$HOME/md4 && LIBTPU_INIT_ARGS=\"$TPU_FLAGS \${LIBTPU_INIT_ARGS:-}\" \
nohup .venv/bin/python main.py --workdir=$WORKDIR ${quoted% } > $LOG 2>&1 &
echo \$! > $PID"
}

logs() {  # follows worker 0's log until its training process ends
  on_workers 0 "tail -n +1 --pid=\$(cat $PID) -f $LOG"
}

delete() {
  run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

case "$COMMAND" in
  all) create; install; train; logs; delete ;;
  *) "$COMMAND" ;;
esac
