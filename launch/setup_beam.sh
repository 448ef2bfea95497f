#!/usr/bin/env bash
# Creates ./.venv-beam (once; again when pyproject.toml changes): gemma_jax
# with the `test` and `beam` extras, beside ./.venv. Sourced by .ci/run and
# scripts/bench_prepare.sh; sets $beam_py.
#
# A venv of its own because apache-beam pins older protobuf and pyarrow
# (Beam 2.78: protobuf < 7, pyarrow < 26) than ./.venv resolves to
# (protobuf 7.x, pyarrow 26.x): installed there, the extra would downgrade
# them under the whole suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
beam_venv=.venv-beam
if [ ! -x "$beam_venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$beam_venv"
fi
stamp="$beam_venv/.gemma_jax_installed_test_beam"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$beam_venv/bin/python" -m pip install --quiet --upgrade pip
  "$beam_venv/bin/python" -m pip install --quiet -e ".[test,beam]"
  touch "$stamp"
fi
beam_py="$beam_venv/bin/python"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
