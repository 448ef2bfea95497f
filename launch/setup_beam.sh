#!/usr/bin/env bash
# Creates ./.venv-beam (once; again when pyproject.toml changes): the `beam`
# extra on top of ./.venv. Sourced by .ci/run and scripts/bench_prepare.sh
# after launch/setup.sh; sets $beam_py.
#
# Why a venv of its own: apache-beam pins older protobuf and pyarrow (Beam
# 2.78: protobuf < 7, pyarrow < 26) than ./.venv resolves to (protobuf 7.x,
# pyarrow 26.x); installed there, the extra would downgrade them under the
# whole suite. Why on top of ./.venv: a .pth file adds ./.venv's packages
# after its own, so pip installs only Beam, its own dependencies and the
# versions it pins (about 20 s of CPU, against 2 minutes for a whole venv),
# and those shadow ./.venv's here only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
beam_venv=.venv-beam
site_of() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
if [ ! -x "$beam_venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$beam_venv"
fi
echo "import site; site.addsitedir('$(site_of .venv/bin/python)')" \
  > "$(site_of "$beam_venv/bin/python")/zz_gemma_jax_main_venv.pth"
stamp="$beam_venv/.gemma_jax_installed_beam"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
    || [ .venv/bin/python -nt "$stamp" ]; then
  # The extra's requirements as pyproject.toml states them; gemma_jax itself
  # comes from ./.venv (an editable install, this source tree).
  mapfile -t beam_extra < <("$beam_venv/bin/python" -c "import tomllib
print(*tomllib.load(open('pyproject.toml', 'rb'))['project'][
  'optional-dependencies']['beam'], sep='\n')")
  "$beam_venv/bin/python" -m pip install --quiet "${beam_extra[@]}"
  touch "$stamp"
fi
beam_py="$beam_venv/bin/python"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
