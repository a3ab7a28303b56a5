#!/usr/bin/env bash
# Start a local, offline Label Studio 1.23.2 for trying the backend and for the end-to-end test.
#
#   scripts/label_studio.sh                      # install if needed, start on 127.0.0.1:8080
#   scripts/label_studio.sh --port 8081 --data-dir /tmp/ls-data
#   scripts/label_studio.sh --install-only       # only create the virtual environment
#
# It creates the virtual environment (default .venv-ls, git-ignored) with label-studio==1.23.2
# when it is missing, starts Label Studio in the foreground on 127.0.0.1 with a fresh data
# directory, waits until it answers with the fixed legacy API token, prints the URL and token, and
# stops Label Studio (and removes the data directory it created) on Ctrl-C / SIGTERM.
#
# Every setting can also come from the environment: LS_VENV, LS_PORT, LS_DATA_DIR, LS_USERNAME,
# LS_PASSWORD, LS_TOKEN, LS_START_TIMEOUT (seconds), PYTHON (interpreter used to create the venv).
# Facts behind the environment below: shared/docs/label-studio-1.23-ml-protocol.md.
set -euo pipefail

LS_VERSION="1.23.2"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

venv="${LS_VENV:-$REPO_ROOT/.venv-ls}"
port="${LS_PORT:-8080}"
data_dir="${LS_DATA_DIR:-}"
username="${LS_USERNAME:-admin@example.com}"
password="${LS_PASSWORD:-oneshot-e2e-password}"
# A legacy token: Label Studio stores it as the user's key, usable as "Authorization: Token <key>".
token="${LS_TOKEN:-oneshot-e2e-legacy-token-0123456789}"
start_timeout="${LS_START_TIMEOUT:-240}"
python_bin="${PYTHON:-python3}"
install_only=0

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --port) port="$2"; shift 2 ;;
        --data-dir) data_dir="$2"; shift 2 ;;
        --venv) venv="$2"; shift 2 ;;
        --token) token="$2"; shift 2 ;;
        --install-only) install_only=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "label_studio.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done

log() { echo "[label_studio.sh] $*" >&2; }

ensure_venv() {
    if [[ -x "$venv/bin/label-studio" ]] \
        && "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('label-studio') != '$LS_VERSION')" 2>/dev/null; then
        return 0
    fi
    log "installing label-studio==$LS_VERSION into $venv (about 75 s)"
    "$python_bin" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "label-studio==$LS_VERSION"
}

ensure_venv
if [[ $install_only -eq 1 ]]; then
    log "label-studio $LS_VERSION is installed in $venv"
    exit 0
fi

# Label Studio silently moves to the next port when the requested one is busy; refuse instead, so
# the printed URL is always the one it listens on.
if ! "$venv/bin/python" - "$port" <<'EOF'
import socket, sys
with socket.socket() as s:
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        sys.exit(1)
EOF
then
    log "port $port on 127.0.0.1 is busy; choose another with --port"
    exit 1
fi

created_data_dir=0
if [[ -z "$data_dir" ]]; then
    data_dir="$(mktemp -d "${TMPDIR:-/tmp}/label-studio-data.XXXXXX")"
    created_data_dir=1
fi
mkdir -p "$data_dir"

url="http://127.0.0.1:$port"
ls_pid=""

stop() {
    trap - EXIT INT TERM
    if [[ -n "$ls_pid" ]] && kill -0 "$ls_pid" 2>/dev/null; then
        log "stopping Label Studio (pid $ls_pid)"
        kill -TERM "$ls_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$ls_pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$ls_pid" 2>/dev/null || true
        wait "$ls_pid" 2>/dev/null || true
    fi
    if [[ $created_data_dir -eq 1 ]]; then
        rm -rf "$data_dir"
    fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ff_front_dev_1682_...: the Data Manager's prediction score column then averages the predictions
# of the version the backend serves (without it, only those whose version equals the backend's
# *title*, i.e. none: README step 5 "sort by score" would show an empty column).
# Label Studio also reads the generic HOST, PORT, USERNAME, PASSWORD and USER_TOKEN; a value left in
# the caller's environment would silently override the settings below.
env -u HOST -u PORT -u USERNAME -u PASSWORD -u USER_TOKEN \
    LABEL_STUDIO_BASE_DATA_DIR="$data_dir" \
    DJANGO_DB=sqlite \
    LABEL_STUDIO_HOST="$url" \
    LABEL_STUDIO_USERNAME="$username" \
    LABEL_STUDIO_PASSWORD="$password" \
    LABEL_STUDIO_USER_TOKEN="$token" \
    LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true \
    LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true \
    ML_BLOCK_LOCAL_IP=false \
    SSRF_PROTECTION_ENABLED=false \
    SENTRY_DSN= \
    FRONTEND_SENTRY_DSN= \
    LATEST_VERSION_CHECK=false \
    COLLECT_ANALYTICS=false \
    fflag_feat_utc_210_prediction_validation_15082025=true \
    ff_front_dev_1682_model_version_dropdown_070622_short=true \
    "$venv/bin/label-studio" start --no-browser --internal-host 127.0.0.1 -p "$port" \
    --username "$username" --password "$password" --user-token "$token" \
    --enable-legacy-api-token &
ls_pid=$!

log "starting Label Studio $LS_VERSION on $url (data: $data_dir); the first start runs migrations (~30 s)"
if ! "$venv/bin/python" - "$url" "$token" "$start_timeout" "$ls_pid" <<'EOF'
import os, sys, time, urllib.request

url, token, timeout, pid = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("Label Studio exited during start-up")
    try:
        # The token check proves the user exists and legacy tokens are accepted, not only that
        # the web server is up.
        request = urllib.request.Request(
            url + "/api/current-user/whoami", headers={"Authorization": f"Token {token}"}
        )
        with urllib.request.urlopen(request, timeout=2) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(f"Label Studio did not answer at {url} within {timeout:.0f} s")
EOF
then
    log "Label Studio failed to start"
    exit 1
fi

echo "Label Studio is ready"
echo "LABEL_STUDIO_URL=$url"
echo "LABEL_STUDIO_API_KEY=$token"
echo "login: $username / $password"
wait "$ls_pid"
