#!/usr/bin/env bash
# Sets everything up (./.venv with the test and tpu extras), then checks.
#
#   bash launch/test.sh           lint, format, then the whole suite with the
#                                 type check beside it (CI)
#   bash launch/test.sh --fast    lint, then the suite without the tests marked
#                                 slow, multiprocess or tpu_compile (the edit loop)
#   bash launch/test.sh tests/model -x    only pytest, with these arguments
#
# The first two run pytest on one worker per core (pytest-xdist), at most 4
# (each worker holds a JAX runtime with 8 fake devices) or
# $GEMMA_JAX_TEST_WORKERS. `worksteal` hands each worker half of the tests in
# collection order, which tests/conftest.py starts with the longest modules,
# and an idle worker takes over half of the other's rest.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
py=.venv/bin/python

if [ "$#" -gt 0 ] && [ "$1" != "--fast" ]; then
  exec "$py" -m pytest "$@"
fi

workers="${GEMMA_JAX_TEST_WORKERS:-$(nproc)}"
if [ "$workers" -gt 4 ] && [ -z "${GEMMA_JAX_TEST_WORKERS-}" ]; then
  workers=4
fi
parallel=(-n "$workers" --dist worksteal)

echo "== ruff check"; "$py" -m ruff check --quiet .
if [ "${1-}" = "--fast" ]; then
  echo "== pytest (fast)"
  exec "$py" -m pytest "${parallel[@]}" \
    -m "not slow and not multiprocess and not tpu_compile" tests
fi
echo "== ruff format --check"; "$py" -m ruff format --check --quiet .
# mypy (a minute of CPU when its cache is cold, as on CI) runs beside the
# suite, not before it: the suite's workers also wait on the processes they
# start (a lost host's heartbeat, a reference run), and the whole took
# 6 min 38 s against 8 min one after the other (docs/performance.md). Its
# report follows the suite's; either failing fails the whole.
mypy_log="$(mktemp)"
"$py" -m mypy >"$mypy_log" 2>&1 &
mypy_pid=$!
trap '[ -z "$mypy_pid" ] || kill "$mypy_pid" 2>/dev/null || true; rm -f "$mypy_log"' EXIT
echo "== pytest (mypy beside it)"
status=0
"$py" -m pytest "${parallel[@]}" tests || status=$?
echo "== mypy"
if ! wait "$mypy_pid"; then status=$((status ? status : 1)); fi
mypy_pid=""  # ended: nothing for the exit trap to stop
cat "$mypy_log"
exit "$status"
