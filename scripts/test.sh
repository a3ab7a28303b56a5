#!/usr/bin/env bash
# One command on a fresh machine: set up what the tests need, then run them all.
#   bash scripts/test.sh               # .venv, Label Studio 1.23.2 in .venv-ls, every test (~5 min)
#   bash scripts/test.sh tests/engine  # arguments go to pytest
# The end-to-end tests start their own Label Studio and backend; the Redis store tests run when a
# redis-server binary is on PATH and are skipped otherwise. CI runs the same tests through
# .ci/run, which also installs redis-server and lints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -x .venv/bin/pytest ]] || bash scripts/setup.sh
bash scripts/label_studio.sh --install-only
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-2}"
ONESHOT_E2E="${ONESHOT_E2E:-1}" exec .venv/bin/python -m pytest "$@"
