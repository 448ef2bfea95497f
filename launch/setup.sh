#!/usr/bin/env bash
# Creates ./.venv (once) and installs gemma_jax with the extras named in
# $GEMMA_JAX_EXTRAS (default: test,tpu; empty: none). Sourced by launch/*.sh; safe to re-run.
#
# The `tpu` extra brings libtpu, used here only to compile ahead of time for
# TPU topologies on a CPU machine; JAX_PLATFORMS=cpu keeps it from probing for
# TPU chips.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${GEMMA_JAX_EXTRAS-test,tpu}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.gemma_jax_installed_${extras//,/_}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  if [ -n "$extras" ]; then
    .venv/bin/python -m pip install --quiet -e ".[${extras}]"
  else
    .venv/bin/python -m pip install --quiet -e .
  fi
  touch "$stamp"
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
