#!/bin/sh
# Start Debian's dockerd privately (for CI and bare VMs) unless an engine already answers.
#
# Usage:  export DOCKER_HOST="$(docker/start-dockerd.sh [DATA_DIR])"
#
# Idempotent: prints the DOCKER_HOST of the first engine that answers ($DOCKER_HOST,
# the default socket, or one this script started earlier under DATA_DIR); otherwise
# starts one there and waits for it. Progress goes to stderr, the url to stdout.
# Same behaviour as megaflow.sandbox.dockerd.ensure_dockerd.
set -eu

DATA_DIR="${1:-${MEGAFLOW_DOCKERD_DIR:-/tmp/megaflow-dockerd}}"
TIMEOUT="${MEGAFLOW_DOCKERD_TIMEOUT:-60}"

answers() {
    docker -H "$1" version >/dev/null 2>&1
}

for url in "${DOCKER_HOST:-}" unix:///var/run/docker.sock; do
    if [ -n "$url" ] && answers "$url"; then
        echo "$url"
        exit 0
    fi
done

mkdir -p "$DATA_DIR"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
URL="unix://$DATA_DIR/docker.sock"
LOG="$DATA_DIR/dockerd.log"

# Serialise concurrent CI steps: only one of them starts the daemon.
exec 9>"$DATA_DIR/start.lock"
flock 9

if ! answers "$URL"; then
    [ "$(id -u)" = 0 ] || { echo "start-dockerd: starting dockerd needs root" >&2; exit 1; }
    command -v dockerd >/dev/null || { echo "start-dockerd: dockerd not installed (apt-get install docker.io)" >&2; exit 1; }
    echo "start-dockerd: starting dockerd, log in $LOG" >&2
    # No iptables and no default bridge: sandboxes run with --network none.
    setsid dockerd \
        --iptables=false --ip6tables=false --bridge=none \
        --host="$URL" \
        --data-root="$DATA_DIR/data" \
        --exec-root="$DATA_DIR/exec" \
        --pidfile="$DATA_DIR/dockerd.pid" \
        </dev/null >>"$LOG" 2>&1 9>&- &
    pid=$!
    waited=0
    until answers "$URL"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "start-dockerd: dockerd exited; last lines of $LOG:" >&2
            tail -n 15 "$LOG" >&2
            exit 1
        fi
        if [ "$waited" -ge "$((TIMEOUT * 5))" ]; then
            echo "start-dockerd: dockerd did not answer within ${TIMEOUT}s; see $LOG" >&2
            tail -n 15 "$LOG" >&2
            exit 1
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
fi

echo "$URL"
