#!/usr/bin/env bash
# Runs `gemma-jax train` on one TPU VM host (or GKE pod); started on every
# worker by `gemma-jax launch run` (gemma_jax/launch/tpu.py):
#
#   JAX_PLATFORMS=tpu GEMMA_JAX_DISTRIBUTED=1 GEMMA_JAX_EXTRAS=tpu \
#     bash launch/tpu_worker.sh SLICE CONFIG --workdir WORKDIR [train args]
#
# 1. ends a previous run of this script on the host (SIGTERM, then SIGKILL
#    after 60 s): only one process may hold the TPU chips;
# 2. sets up .venv (launch/setup.sh, the `tpu` extra) with Python 3.11+,
#    installing python3.11 with apt where the image has only 3.10;
# 3. trains, its output to ~/gemma_jax_run/train.log (and stdout);
# 4. writes ~/gemma_jax_run/exit_code: the trainer's exit status, or
#    `terminated` when this script got SIGTERM (`gemma-jax launch stop`, or
#    the VM going away): the trainer then saved a checkpoint and the run is
#    not finished;
# 5. copies the log to WORKDIR/logs/slice-S-worker-W.log every 5 minutes and
#    at the end (gcloud storage for gs://, cp otherwise).
#
# GEMMA_JAX_BIN: a gemma-jax already installed (a container image): no .venv
# is set up. GEMMA_JAX_RUN_DIR overrides ~/gemma_jax_run.
set -uo pipefail
cd "$(dirname "$0")/.."
slice=$1; shift
workdir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ ${args[i]} == --workdir ]] && workdir=${args[i+1]:-}
done
run_dir=${GEMMA_JAX_RUN_DIR:-$HOME/gemma_jax_run}
mkdir -p "$run_dir"

# The worker's index in its slice: GKE sets TPU_WORKER_ID; a TPU VM has it
# in its metadata (as JAX reads it: agent-worker-number).
metadata=http://metadata.google.internal/computeMetadata/v1/instance
worker=${TPU_WORKER_ID:-$(curl -s -m 5 -H 'Metadata-Flavor: Google' \
  "$metadata/attributes/agent-worker-number" 2>/dev/null || true)}
[[ $worker =~ ^[0-9]+$ ]] || worker=0
export GEMMA_JAX_SLICE=$slice GEMMA_JAX_WORKER=$worker

old=$(cat "$run_dir/worker.pid" 2>/dev/null || true)
# Only if that pid is still this script (pids are reused).
if [[ -n $old ]] && grep -qs tpu_worker.sh "/proc/$old/cmdline"; then
  if kill -TERM "$old" 2>/dev/null; then
    for _ in $(seq 60); do kill -0 "$old" 2>/dev/null || break; sleep 1; done
    kill -KILL "$old" 2>/dev/null || true
  fi
fi
echo $$ > "$run_dir/worker.pid"
rm -f "$run_dir/exit_code"
log=$run_dir/train.log

upload() {
  [[ -n $workdir ]] || return 0
  local dest=$workdir/logs/slice-$slice-worker-$worker.log
  if [[ $workdir == gs://* ]]; then
    gcloud storage cp --quiet "$log" "$dest" > /dev/null 2>&1 || true
  else
    mkdir -p "$workdir/logs" && cp "$log" "$dest"
  fi
}

terminated=0 child=""
on_term() {
  terminated=1
  [[ -n $child ]] && kill -TERM "$child" 2>/dev/null
}
trap on_term TERM

echo "== $(date -u +%FT%TZ) slice $slice worker $worker: gemma-jax train $*" \
  >> "$log"
gemma_jax=${GEMMA_JAX_BIN:-}
# TPU VM images (Ubuntu 22.04) bring Python 3.10; gemma-jax needs 3.11+.
pick_python() {
  local p
  for p in ${PYTHON:-} python3.12 python3.11 python3; do
    if command -v "$p" > /dev/null && "$p" -c \
        'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$p"; return
    fi
  done
  sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 \
    python3.11-venv > /dev/null && echo python3.11
}
if [[ -z $gemma_jax ]]; then
  PYTHON=$(pick_python 2>> "$log"); export PYTHON
  if [[ -z $PYTHON ]] || ! (source launch/setup.sh) >> "$log" 2>&1; then
    echo "== setup failed (launch/setup.sh), see above" >> "$log"
    echo setup-failed > "$run_dir/exit_code"
    upload; rm -f "$run_dir/worker.pid"; exit 1
  fi
  gemma_jax=.venv/bin/gemma-jax
fi
exec 3> >(tee -a "$log")
tee_pid=$!
"$gemma_jax" train "$@" >&3 2>&1 &
child=$!
(
  trap 'kill "$nap" 2>/dev/null; exit 0' TERM
  while true; do sleep 300 & nap=$!; wait "$nap"; upload; done
) > /dev/null 2>&1 &
uploader=$!
# `wait` returns early (status > 128) when a trapped signal arrives: wait
# again until the trainer has exited and its own status is known (a second
# wait on an already reaped child answers 127).
wait "$child"; code=$?
while (( code > 128 )); do
  wait "$child"; next=$?
  [[ $next == 127 ]] && break
  code=$next
done
kill "$uploader" 2>/dev/null
exec 3>&-
wait "$tee_pid" 2>/dev/null
note=$([[ $terminated == 1 ]] && echo ' (SIGTERM)')
echo "== $(date -u +%FT%TZ) exit $code$note" >> "$log"
if [[ $terminated == 1 ]]; then echo terminated; else echo "$code"; fi \
  > "$run_dir/exit_code"
upload
rm -f "$run_dir/worker.pid"
exit "$code"
