#!/usr/bin/env bash
# The test command: brings up everything the tests need on a fresh machine, then runs
# the Rust suites (cargo nextest, every crate) and the Python client-compatibility
# tests (official openai and anthropic SDKs, in a venv).
#
#   ./scripts/test.sh            # everything
#   ./scripts/test.sh --rust     # only the Rust suites
#   ./scripts/test.sh --python   # only the Python SDK tests (builds the binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

want_rust=1; want_python=1
case "${1:-}" in
  --rust) want_python=0 ;;
  --python) want_rust=0 ;;
  "") ;;
  *) echo "usage: $0 [--rust|--python]" >&2; exit 2 ;;
esac

have() { command -v "$1" >/dev/null 2>&1; }

apt_install() {
  # Install Debian packages when missing (CI and fresh machines run as root).
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "== installing ${missing[*]} (apt)"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
}

# cargo-nextest: the runner. Install it when the machine lacks it.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# Python venv with the official SDKs and pytest.
setup_venv() {
  local venv="$root/.venv"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || { apt_install python3-venv; python3 -m venv "$venv"; }
  fi
  local stamp="$venv/.deps-$(sha256sum tests/python/requirements.txt | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt
    touch "$stamp"
  fi
}

# Headless Chromium for the dashboard test (tests/python/test_dashboard.py): Debian's
# browser and its matching driver, so nothing is downloaded at test time. The test fails
# (never skips) without them.
setup_browser() {
  apt_install chromium chromium-driver
}

# Redis: the store tests and the multi-replica tests use the server on 127.0.0.1:6379
# (their own key prefixes; nothing is flushed). Install and start one if none answers.
# Tests that stop Redis start their own redis-server on a free port.
ensure_redis() {
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt_install redis-server redis-tools
  fi
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "== starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /tmp --logfile /tmp/tollgate-test-redis.log
    for _ in $(seq 1 50); do
      redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  fi
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { echo "redis is not answering on 6379" >&2; exit 1; }
}
ensure_redis

# The venv and Chromium are fetched while the Rust suites build and run: both mostly
# wait on the network and the disk (a fresh machine spent ~2 min here), the build on the CPU.
target_dir="${CARGO_TARGET_DIR:-$root/target}"
provision_log="$target_dir/python-setup.log"
provision_pid=
if [ $want_python -eq 1 ]; then
  mkdir -p "$target_dir"
  ( set -e; setup_venv; setup_browser ) >"$provision_log" 2>&1 &
  provision_pid=$!
fi

status=0
if [ $want_rust -eq 1 ]; then
  echo "== cargo nextest run --workspace"
  cargo nextest run --workspace --no-fail-fast || status=1
fi

if [ $want_python -eq 1 ]; then
  echo "== waiting for the Python venv and Chromium"
  if ! wait "$provision_pid"; then
    cat "$provision_log" >&2
    echo "setting up the Python tests failed (log above)" >&2
    exit 1
  fi
  cat "$provision_log"
  echo "== building tollgate for the Python tests"
  cargo build -q -p tollgate
  export TOLLGATE_BIN="$target_dir/debug/tollgate"
  echo "== pytest tests/python"
  set +e
  "$root/.venv/bin/python" -m pytest -q tests/python
  rc=$?
  set -e
  # pytest exits 5 when it collected nothing: that is a failure here.
  [ $rc -eq 0 ] || status=1
fi
exit $status
