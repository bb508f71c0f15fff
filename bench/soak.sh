#!/usr/bin/env bash
# bench/soak.sh: a long run of mixed traffic through tollgate, then the accounting audit.
#
# Usage:
#   bench/soak.sh [--duration 10m] [--no-build] [any other tollgate-soak option]
#
# Starts `tollgate sim` and `tollgate serve` (reserve accounting, one token counter per
# key, JSON access log) on free loopback ports, then runs tollgate-soak: every API,
# streamed and not, about 10% of calls with an upstream fault (x-sim-fault), 10% of
# clients leaving mid-stream or before the answer, 200 calls/s (--rate) from 16 clients
# (-c). It prints the gateway's RSS at start and end, requests, p50/p99, reservations
# outstanding at the end (must be 0) and the audit: tokens charged where usage arrived
# against what the simulator reported (must be equal), estimates listed apart, counters
# against the access log. Exits non-zero when the audit fails.
#
# Environment: CARGO_TARGET_DIR (binaries) [<repo>/target], KEEP=1 keeps the logs (kept
# anyway when the audit fails).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
BUILD=1
ARGS=()
DURATION=10m
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --duration) DURATION=$2; shift ;;
    --duration=*) DURATION=${1#--duration=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done

SCRIPT=soak.sh
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

start_sim

GW_PORT=$(free_port)
ADMIN_PORT=$(free_port)
cat >"$TMP/tollgate.yaml" <<EOF
listen: 127.0.0.1:$GW_PORT
admin:
  listen: 127.0.0.1:$ADMIN_PORT
logging:
  format: json
  level: warn,tollgate::access=info
  access_log: true
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
      - { key: soak-key-1, identity: { userid: u1 } }
      - { key: soak-key-2, identity: { userid: u2 } }
      - { key: soak-key-3, identity: { userid: u3 } }
      - { key: soak-key-4, identity: { userid: u4 } }
policies:
  - name: soak
    kind: TokenRateLimitPolicy
    accounting: reserve
    limits:
      all:
        rates: [{ limit: 1000000000000, window: 30d }]
        counters: [auth.identity.userid]
EOF
env -u RUST_LOG "$BIN/tollgate" serve -c "$TMP/tollgate.yaml" >"$TMP/tollgate.out" 2>"$TMP/tollgate.log" &
GW_PID=$!
PIDS+=($GW_PID)
wait_http "http://127.0.0.1:$ADMIN_PORT/healthz" tollgate "$TMP/tollgate.log"

rc=0
"$BIN/tollgate-soak" --proxy "127.0.0.1:$GW_PORT" --admin "127.0.0.1:$ADMIN_PORT" \
  --keys soak-key-1,soak-key-2,soak-key-3,soak-key-4 --duration "$DURATION" \
  --gateway-pid "$GW_PID" --gateway-log "$TMP/tollgate.log" "${ARGS[@]}" || rc=$?
# A failed audit keeps the gateway's log (every access line) for the post-mortem.
[[ $rc == 0 ]] || KEEP=1
exit $rc
