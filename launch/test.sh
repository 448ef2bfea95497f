#!/usr/bin/env bash
# Sets everything up (./.venv with the test and tpu extras), then checks.
#
#   bash launch/test.sh           lint, format, types, then the whole suite (CI)
#   bash launch/test.sh --fast    lint, then the suite without the tests marked
#                                 slow, multiprocess or tpu_compile (the edit loop)
#   bash launch/test.sh tests/model -x    only pytest, with these arguments
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
py=.venv/bin/python

if [ "$#" -gt 0 ] && [ "$1" != "--fast" ]; then
  exec "$py" -m pytest "$@"
fi

echo "== ruff check"; "$py" -m ruff check --quiet .
if [ "${1-}" = "--fast" ]; then
  echo "== pytest (fast)"
  exec "$py" -m pytest -m "not slow and not multiprocess and not tpu_compile" \
    tests
fi
echo "== ruff format --check"; "$py" -m ruff format --check --quiet .
echo "== mypy"; "$py" -m mypy
echo "== pytest"; exec "$py" -m pytest tests
