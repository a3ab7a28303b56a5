#!/usr/bin/env bash
# Screenshot of pre-labels in Label Studio's real UI, for the README: docs/prelabels.png.
#
#   scripts/screenshot.sh [OUTPUT.png]
#
# Starts Label Studio (scripts/label_studio.sh) and the backend (`python _wsgi.py`, by default with
# the small random-weight models: ONESHOT_RANDOM_WEIGHTS=1, so the masks shown are not meaningful;
# export ONESHOT_RANDOM_WEIGHTS=0 and the model settings to show real ones), labels one DAVIS image,
# retrieves predictions for the others, and captures a pre-labeled task with headless Chromium
# (Debian package `chromium`, installed with apt-get when missing and running as root).
#
# Environment: BACKEND_PYTHON (default .venv/bin/python), LS_VENV (default .venv-ls),
# ONESHOT_DATA_DIR (default ../shared/data/oneshot_seg_real), SCREENSHOT_SEQUENCE (default
# davis2016_val/blackswan).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
output="${1:-docs/prelabels.png}"
backend_python="${BACKEND_PYTHON:-$REPO_ROOT/.venv/bin/python}"
ls_venv="${LS_VENV:-$REPO_ROOT/.venv-ls}"
data_dir="${ONESHOT_DATA_DIR:-$REPO_ROOT/../shared/data/oneshot_seg_real}"
sequence="${SCREENSHOT_SEQUENCE:-davis2016_val/blackswan}"
username="admin@example.com"
password="oneshot-screenshot-password"
token="oneshot-screenshot-token-0123456789"

log() { echo "[screenshot.sh] $*" >&2; }

if ! command -v chromium >/dev/null 2>&1; then
    if [[ $(id -u) -ne 0 ]]; then
        log "needs the Debian package chromium (apt-get install chromium)"
        exit 1
    fi
    log "installing chromium"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
LS_VENV="$ls_venv" bash scripts/label_studio.sh --install-only
if ! "$ls_venv/bin/python" -c "import websocket" 2>/dev/null; then
    "$ls_venv/bin/python" -m pip install --quiet websocket-client
fi

free_port() { "$ls_venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work="$(mktemp -d "${TMPDIR:-/tmp}/oneshot-screenshot.XXXXXX")"
ls_port="$(free_port)"
backend_port="$(free_port)"
ls_pid=""
backend_pid=""

cleanup() {
    for pid in "$backend_pid" "$ls_pid"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$work"
}
trap cleanup EXIT

LS_VENV="$ls_venv" LS_USERNAME="$username" LS_PASSWORD="$password" \
    bash scripts/label_studio.sh --port "$ls_port" --data-dir "$work/ls-data" \
    --token "$token" >"$work/label_studio.log" 2>&1 &
ls_pid=$!
env ONESHOT_RANDOM_WEIGHTS="${ONESHOT_RANDOM_WEIGHTS:-1}" MODEL_DIR="${MODEL_DIR:-$work/model_dir}" \
    LABEL_STUDIO_URL="http://127.0.0.1:$ls_port" LABEL_STUDIO_API_KEY="$token" \
    "$backend_python" _wsgi.py --host 127.0.0.1 --port "$backend_port" >"$work/backend.log" 2>&1 &
backend_pid=$!

log "waiting for Label Studio (port $ls_port) and the backend (port $backend_port)"
for _ in $(seq 1 600); do
    grep -q "Label Studio is ready" "$work/label_studio.log" 2>/dev/null \
        && curl -sf "http://127.0.0.1:$backend_port/health" >/dev/null && break
    kill -0 "$ls_pid" 2>/dev/null || { tail -30 "$work/label_studio.log" >&2; exit 1; }
    kill -0 "$backend_pid" 2>/dev/null || { tail -30 "$work/backend.log" >&2; exit 1; }
    sleep 1
done

"$ls_venv/bin/python" scripts/screenshot_prelabels.py \
    --url "http://127.0.0.1:$ls_port" --token "$token" \
    --username "$username" --password "$password" \
    --backend-url "http://127.0.0.1:$backend_port" \
    --images "$data_dir/$sequence/00000.jpg" "$data_dir/$sequence/00010.jpg" \
    "$data_dir/$sequence/00020.jpg" \
    --output "$output" || { tail -40 "$work/backend.log" >&2; exit 1; }
