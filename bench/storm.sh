#!/usr/bin/env bash
# bench/storm.sh: a connection storm against tollgate.
#
# Usage:
#   bench/storm.sh [--idle 4000] [--partial N] [--duration 10s] [-c 8] [--no-build]
#
# Starts `tollgate sim` and `tollgate serve` on free loopback ports, raises the open-file
# limit (ulimit -n; the gateway and the storm tool inherit it), then runs tollgate-storm:
# a baseline phase (active clients calling chat completions through the gateway while the
# admin API is probed: /healthz, /readyz, /metrics, /admin/status, /admin/counters, each
# on a fresh connection), then the same with thousands of idle connections held open on
# the proxy listener (--partial of them with half a request line, slowloris style).
# Prints throughput and p50/p99/max of the active calls and of the admin probes in both
# phases, failures, how many idle connections the gateway closed, and the gateway's RSS.
# Exits non-zero when an admin probe or an active call failed.
#
# Environment: CARGO_TARGET_DIR (binaries) [<repo>/target], KEEP=1 keeps the logs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
BUILD=1
ARGS=()
IDLE=4000
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --idle) IDLE=$2; shift ;;
    --idle=*) IDLE=${1#--idle=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done

SCRIPT=storm.sh
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# Every idle connection is a descriptor on both sides; leave room for the rest.
WANT=$((IDLE + 1024))
if [[ $(ulimit -n) != unlimited && $(ulimit -n) -lt $WANT ]]; then
  ulimit -n "$WANT" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fi
log "open-file limit: $(ulimit -n)"
if [[ $(ulimit -n) != unlimited && $(ulimit -n) -lt $WANT ]]; then
  log "warning: ulimit -n $(ulimit -n) < $WANT: some idle connections will fail"
fi

start_sim

GW_PORT=$(free_port)
ADMIN_PORT=$(free_port)
cat >"$TMP/tollgate.yaml" <<EOF
listen: 127.0.0.1:$GW_PORT
admin:
  listen: 127.0.0.1:$ADMIN_PORT
logging:
  level: warn
  access_log: false
backends:
  - name: sim
    url: http://127.0.0.1:$SIM_PORT
routes:
  - name: llm
    match: { path_prefix: /v1 }
    backend: sim
auth:
  api_keys:
    prefixes: [Bearer]
    keys:
      - { key: storm-key, identity: { userid: storm } }
policies:
  - name: storm
    kind: TokenRateLimitPolicy
    limits:
      all:
        rates: [{ limit: 1000000000000, window: 1h }]
        counters: [auth.identity.userid]
EOF
env -u RUST_LOG "$BIN/tollgate" serve -c "$TMP/tollgate.yaml" >"$TMP/tollgate.out" 2>"$TMP/tollgate.log" &
GW_PID=$!
PIDS+=($GW_PID)
wait_http "http://127.0.0.1:$ADMIN_PORT/healthz" tollgate "$TMP/tollgate.log"

"$BIN/tollgate-storm" --proxy "127.0.0.1:$GW_PORT" --admin "127.0.0.1:$ADMIN_PORT" \
  --key storm-key --idle "$IDLE" --gateway-pid "$GW_PID" "${ARGS[@]}"
