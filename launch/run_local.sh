#!/usr/bin/env bash
# The README's main job, from a fresh clone, in one command:
#
#   bash launch/run_local.sh
#
# 1. creates .venv (if missing) and installs gemma-jax into it;
# 2. builds the embedded corpus and its tokenizer (cached in
#    ~/.cache/gemma_jax/corpus; nothing is downloaded);
# 3. trains configs/tiny.yaml on the CPU into runs/tiny: checkpoints,
#    per-source evaluation, a params export and a short sample;
# 4. draws the curves into runs/tiny/plots.
#
# Run it again and training resumes from the latest checkpoint. Extra
# arguments go to `gemma-jax train`, e.g. `--steps 600` or `--set key=value`.
set -euo pipefail
cd "$(dirname "$0")/.."

WORKDIR=${WORKDIR:-runs/tiny}
# The CPU job needs no extras (the `tpu` extra is only for AOT compiles).
GEMMA_JAX_EXTRAS="" source launch/setup.sh

# Compiled programs are cached so that a rerun starts quickly.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/gemma_jax/xla}

start=$(date +%s)
.venv/bin/gemma-jax data build-default
.venv/bin/gemma-jax train configs/tiny.yaml --workdir "$WORKDIR" "$@"
.venv/bin/gemma-jax plot "$WORKDIR"
echo "done in $(( $(date +%s) - start ))s; metrics: $WORKDIR/metrics.jsonl," \
     "TensorBoard: tensorboard --logdir $WORKDIR/tensorboard"
