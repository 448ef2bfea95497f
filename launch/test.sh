#!/usr/bin/env bash
# Sets everything up (./.venv with the test and tpu extras) and runs the suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh tests/model -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
exec .venv/bin/python -m pytest "${@:-tests}"
