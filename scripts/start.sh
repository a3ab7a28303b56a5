#!/usr/bin/env bash
# One command: set up .venv if needed, then serve the backend with gunicorn on ${PORT:-9090}.
#   bash scripts/start.sh                          # real models (downloaded once into MODEL_DIR)
#   ONESHOT_RANDOM_WEIGHTS=1 bash scripts/start.sh  # smoke run with tiny random models
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -x .venv/bin/gunicorn ]] || bash scripts/setup.sh
# --no-control-socket: gunicorn 27's control socket has one default path per user, so a second
# backend on the machine would take the first one's; nothing here uses it.
exec .venv/bin/gunicorn --bind "${HOST:-0.0.0.0}:${PORT:-9090}" --workers "${WORKERS:-1}" \
    --threads "${THREADS:-16}" --timeout "${TIMEOUT:-300}" --no-control-socket _wsgi:app
