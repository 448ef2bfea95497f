#!/usr/bin/env bash
# Issue 22's throughput numbers, in one command (measure on a quiet machine):
#
#   bash scripts/bench_prepare.sh [--copies 6]
#
# `gemma-jax data prepare` tokens/s at 1 and 2 worker processes and through
# Beam's DirectRunner, then the pipeline's read throughput per host on the
# prepared data (seq_len 8192, prefetch) against what one host of every pod
# config consumes, with the margins (scripts/bench_data.py --prepare). Runs
# in ./.venv-beam (launch/setup_beam.sh), the venv that has the beam extra.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh        # ./.venv
source launch/setup_beam.sh   # ./.venv-beam on top of it
"$beam_py" -c "import apache_beam"  # else the Beam row would be left out
exec "$beam_py" scripts/bench_data.py --prepare "$@"
