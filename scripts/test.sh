#!/usr/bin/env bash
# The test suite as CI runs it (the README's test command):
#   bash scripts/test.sh         # everything: two workers, then the serial tests alone
#   bash scripts/test.sh fast    # the fast tier: -m "not slow" on two workers
# Extra arguments go to pytest (e.g. -x, -k lens). Under CI=true a test whose model is missing
# fails instead of skipping (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
if [ "${1:-}" = "fast" ]; then
  shift
  exec "$python" -m pytest -q -rs -n 2 --dist worksteal -m "not slow" --durations=25 "$@"
fi
# serial tests hold a child process's time against its plan: run them with nothing beside them
"$python" -m pytest -q -rs -n 2 --dist worksteal -m "not serial" --durations=25 "$@"
"$python" -m pytest -q -rs -m serial --durations=10 "$@"
