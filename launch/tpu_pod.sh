#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (or several, multi-slice): the same
# `gemma-jax train` runs on every host, one JAX process per host.
#
#   bash launch/tpu_pod.sh --tpu my-v5e-256 --zone us-west4-a \
#       configs/pods/gemma-2b-v5e.yaml --workdir gs://my-bucket/runs/gemma-2b
#   bash launch/tpu_pod.sh --tpu my-slices --slices 2 --zone us-west4-a \
#       configs/pods/gemma2-2b-v5e-2slices.yaml --workdir gs://my-bucket/runs/g2-2b
#
# Before: create the TPU VM(s), e.g.
#   gcloud compute tpus tpu-vm create my-v5e-256 --zone us-west4-a \
#       --accelerator-type v5litepod-256 --version v2-alpha-tpuv5-lite
# or, for N slices, queued resources with `--node-count N --node-prefix NAME`
# (nodes NAME-0 ... NAME-(N-1); the TPU runtime sets the MEGASCALE_*
# variables that make them one multi-slice job). The workdir must be on GCS
# so that every host sees the same checkpoints; the data config's paths too.
#
# Steps: pack this checkout (git archive HEAD), copy it to every worker, set up
# .venv there with the `tpu` extra, start training in the background on all
# workers at once (logs: ~/gemma_jax/train.log on each worker). Rerunning the
# command resumes from the latest checkpoint in the workdir. --dry-run prints
# the gcloud commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {  # the header comment; to stderr when it answers a mistake
  local code=${1:-2}
  sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' \
    | if [[ $code == 0 ]]; then cat; else cat >&2; fi
  exit "$code"
}
tpu="" zone="" project="" slices=1 dry_run=0 config="" workdir="" train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --slices) slices=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --*) train_args+=("$1" "$2"); shift 2 ;;   # e.g. --set k=v, --steps N
    *) [[ -z "$config" ]] || { echo "unexpected argument: $1" >&2; usage; }
       config=$1; shift ;;
  esac
done
[[ -n "$tpu" && -n "$zone" && -n "$config" && -n "$workdir" ]] || {
  echo "error: --tpu, --zone, CONFIG and --workdir are required" >&2; usage; }
[[ -f "$config" ]] || { echo "error: config file not found: $config" >&2; exit 2; }
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || {
  echo "error: --slices must be a positive integer, got $slices" >&2; exit 2; }
if [[ "$workdir" != gs://* ]]; then
  echo "error: --workdir must be a gs:// path shared by every host, got $workdir" >&2
  exit 2
fi

run() {
  if [[ $dry_run == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

gcloud_args=(--zone "$zone")
[[ -n "$project" ]] && gcloud_args+=(--project "$project")
if [[ $slices == 1 ]]; then nodes=("$tpu"); else
  nodes=(); for ((i = 0; i < slices; i++)); do nodes+=("$tpu-$i"); done
fi

archive=$(mktemp -d)/gemma_jax.tar.gz
run git archive --format=tar.gz -o "$archive" HEAD

quoted_args=$(printf '%q ' "$config" --workdir "$workdir" "${train_args[@]}")
# JAX_PLATFORMS=tpu: setup.sh would otherwise default to the CPU.
# GEMMA_JAX_DISTRIBUTED=1: one JAX process per host, jax.distributed
# initialised from the TPU environment.
# The old checkout is replaced; its .venv is kept (setup.sh reinstalls only
# when pyproject.toml changed).
remote="set -e; mkdir -p ~/gemma_jax; \
find ~/gemma_jax -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; \
tar xzf ~/gemma_jax.tar.gz -C ~/gemma_jax; cd ~/gemma_jax; \
export JAX_PLATFORMS=tpu GEMMA_JAX_EXTRAS=tpu GEMMA_JAX_DISTRIBUTED=1; \
source launch/setup.sh; \
nohup .venv/bin/gemma-jax train $quoted_args > train.log 2>&1 < /dev/null &"

for node in "${nodes[@]}"; do
  run gcloud compute tpus tpu-vm scp "$archive" "$node:~/gemma_jax.tar.gz" \
      --worker=all "${gcloud_args[@]}"
done
for node in "${nodes[@]}"; do
  run gcloud compute tpus tpu-vm ssh "$node" --worker=all "${gcloud_args[@]}" \
      --command "$remote"
done
echo "started on ${#nodes[@]} slice(s): ${nodes[*]}; follow with:" >&2
echo "  gcloud compute tpus tpu-vm ssh ${nodes[0]} --worker=0 ${gcloud_args[*]} --command 'tail -f ~/gemma_jax/train.log'" >&2
