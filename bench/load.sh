#!/usr/bin/env bash
# bench/load.sh: end-to-end load benchmark of tollgate, printed as one table.
#
# Usage:
#   bench/load.sh [table] [options]   non-streaming chat completions (max_tokens 16, a small
#                                     body, simulator latency 0) at saturation and at a fixed
#                                     offered load
#   bench/load.sh stream [options]    streaming overhead: a 500-token SSE stream
#                                     (stream_options.include_usage, ms_per_token 0) at low
#                                     concurrency; time to first byte and total time
#
# Options:
#   --install-nginx   apt-get install nginx when it is missing (adds the nginx row)
#   --no-nginx        skip the nginx row even when nginx is installed
#   --no-gateway      skip the tollgate row (to try the harness alone)
#   --redis           add two rows: the same gateway with its counters on Redis ($REDIS_URL,
#                     a key prefix of its own), without and with storage.redis.batching (5ms,
#                     cached reads); a memory-vs-Redis comparison at two loads both hold (with the
#                     box's busy cores and the proxy's context switches per request; the
#                     compared targets take turns run by run); and the
#                     accuracy bench (admitted ÷ limit, one gateway and three replicas on Redis)
#   --jwt             add a row: JWT auth (the Gloo seed's token, cached verification)
#                     and three token tiers (minute/hour/day) per `sub`
#   --floors          add two reference rows that split tollgate's cost: the HTTP stack's floor
#                     (tollgate-floor: hyper server + pooled hyper client on tollgate's thread
#                     model, no gateway work at all) and tollgate with no auth and no policies
#                     (routing, request inspection and metering only); with --redis also the
#                     floor making one Redis read per request (tollgate-floor --redis), measured
#                     beside memory vs Redis: what any Redis-backed check costs on this machine
#   --no-build        do not run cargo; use the release binaries already built
#   --access-log      turn on tollgate's access log (and nginx's) instead of leaving both off
#
# Environment (defaults in brackets):
#   CONCURRENCY [32]        workers (= connections) for the table
#   STREAM_CONCURRENCY [4]  workers for `stream`
#   STREAM_TOKENS [500]     tokens per stream
#   STREAM_MS_PER_TOKEN [0] pacing of the simulated stream (0 = all tokens at once; 1 = a
#                           real model's pace, which is what time-to-first-byte is about)
#   DURATION [5s] WARMUP [1s]  per run; RUNS [3] runs per measurement (the median is shown)
#   REDIS_RATE              with --redis: the fixed loads (req/s, space-separated) at which memory
#                           and Redis counters are compared [half and a quarter of the Redis
#                           row's saturation]
#   REDIS_URL               the Redis of --redis [redis://127.0.0.1:6379]; one on a box of
#                           its own no longer takes cores from the proxy under test
#   REDIS_RUNS [5]          runs per target at each of those loads, the targets taking turns
#                           (p99 on a shared box drifts by milliseconds: more runs than RUNS)
#   LOAD_THREADS [1]        tokio threads of the load generator (leave cores for the servers)
#   WORKERS                 proxy threads of every tollgate (server.workers) and of the floor
#                           (--workers) [their default: one per CPU]. On a small box that the
#                           load generator, simulator and Redis share, fewer threads than cores
#                           can be faster: the proxy threads are preempted less
#   CARGO_TARGET_DIR        where binaries are built/found [<repo>/target]
#   SIM_CMD                 simulator command [<bin>/tollgate sim]
#
# What it measures, in one run:
#   (a) direct:   tollgate-load -> `tollgate sim`
#   (b) tollgate: tollgate-load -> `tollgate serve -c bench/quickstart-bench.yaml` -> sim
#                 (API key auth, the quickstart TokenRateLimitPolicy's CEL predicates,
#                 tokens counted from each response; limits so high nothing is refused)
#   (c) nginx:    tollgate-load -> nginx (plain reverse proxy, keepalive upstream) -> sim,
#                 when nginx is installed
# each closed-loop at saturation (CONCURRENCY workers) and open-loop at a fixed offered load
# of a quarter of the direct saturation throughput (latency measured from the scheduled send
# time, so queueing is not hidden: a target that cannot sustain the offered load shows a
# lower req/s, huge percentiles and unsent requests). Every figure is the median of RUNS runs;
# the targets of one table take turns run by run. Every request (to every target) carries
# the same `Authorization: APIKEY iamafreeuser` header.
#
# Everything listens on 127.0.0.1 on free ports; every process started here is stopped on
# exit. All processes share this machine's cores: the load generator, the proxy under test
# and the simulator compete for CPU, so read the figures as relative, not absolute.
set -euo pipefail

MODE=table
INSTALL_NGINX=0
USE_NGINX=1
USE_GATEWAY=1
USE_REDIS=0
USE_JWT=0
USE_FLOORS=0
BUILD=1
ACCESS_LOG=0
for arg in "$@"; do
  case "$arg" in
    table|stream) MODE=$arg ;;
    --install-nginx) INSTALL_NGINX=1 ;;
    --no-nginx) USE_NGINX=0 ;;
    --no-gateway) USE_GATEWAY=0 ;;
    --redis) USE_REDIS=1 ;;
    --jwt) USE_JWT=1 ;;
    --floors) USE_FLOORS=1 ;;
    --no-build) BUILD=0 ;;
    --access-log) ACCESS_LOG=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "load.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

CONCURRENCY=${CONCURRENCY:-32}
STREAM_CONCURRENCY=${STREAM_CONCURRENCY:-4}
STREAM_TOKENS=${STREAM_TOKENS:-500}
STREAM_MS_PER_TOKEN=${STREAM_MS_PER_TOKEN:-0}
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
RUNS=${RUNS:-3}
REDIS_RUNS=${REDIS_RUNS:-5}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
LOAD_THREADS=${LOAD_THREADS:-1}
WORKERS=${WORKERS:-}
[[ -z $WORKERS || $WORKERS =~ ^[1-9][0-9]*$ ]] || { echo "load.sh: WORKERS must be a positive number" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release
TOLLGATE=$BIN/tollgate
LOAD=$BIN/tollgate-load
FLOOR=$BIN/tollgate-floor
AUTH_HEADER="Authorization: APIKEY iamafreeuser"

log() { printf '%s\n' "$*" >&2; }
die() { log "load.sh: $*"; exit 1; }

# ---------------------------------------------------------------- processes and cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-bench.XXXXXX")
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A port nothing listens on (checked, then handed to the server; the window is tiny), from
# below the kernel's ephemeral range: outgoing connections (the gateways' own, to the
# simulator and Redis) take their local ports from that range, and one holding a port
# makes a later listen on it fail.
TAKEN_PORTS=" "
free_port() {
  local p i lo=10000 hi=32768
  [[ -r /proc/sys/net/ipv4/ip_local_port_range ]] && read -r hi _ </proc/sys/net/ipv4/ip_local_port_range
  ((hi > lo + 1000)) || { lo=20000; hi=60000; }
  for i in $(seq 1 100); do
    p=$((lo + RANDOM % (hi - lo)))
    [[ $TAKEN_PORTS == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      TAKEN_PORTS+="$p "
      echo "$p"
      return 0
    fi
  done
  die "no free port found"
}

# wait_http URL NAME LOGFILE: until URL answers 2xx (10 s at most).
wait_http() {
  local url=$1 name=$2 logfile=$3 i code
  for i in $(seq 1 200); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$url" 2>/dev/null || true)
    [[ $code == 2* ]] && return 0
    sleep 0.05
  done
  log "---- $name log ($logfile):"
  tail -n 30 "$logfile" >&2 || true
  die "$name did not become ready at $url"
}

# ---------------------------------------------------------------- build
command -v curl >/dev/null || die "curl is required"
if [[ $BUILD == 1 ]]; then
  log "building release binaries (cargo build --release -p tollgate -p tollgate-bench)..."
  if [[ $USE_GATEWAY == 1 || -z ${SIM_CMD:-} ]]; then
    (cd "$ROOT" && cargo build --release -q -p tollgate -p tollgate-bench)
  else
    (cd "$ROOT" && cargo build --release -q -p tollgate-bench)
  fi
fi
[[ -x $LOAD ]] || die "$LOAD not found (build it, or set CARGO_TARGET_DIR)"
[[ $USE_FLOORS == 0 || -x $FLOOR ]] || die "$FLOOR not found (build it, or set CARGO_TARGET_DIR)"
if [[ $USE_GATEWAY == 1 || -z ${SIM_CMD:-} ]]; then
  [[ -x $TOLLGATE ]] || die "$TOLLGATE not found (build it, or set CARGO_TARGET_DIR)"
fi
read -r -a SIM_ARGV <<<"${SIM_CMD:-$TOLLGATE sim}"

# ---------------------------------------------------------------- nginx
NGINX=""
if [[ $USE_NGINX == 1 ]]; then
  if ! command -v nginx >/dev/null && [[ $INSTALL_NGINX == 1 ]]; then
    log "installing nginx (apt-get)..."
    # Keep the package's post-install from starting a system-wide nginx on port 80.
    POLICY=/usr/sbin/policy-rc.d
    ADDED_POLICY=0
    if [[ ! -e $POLICY ]]; then
      printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod +x "$POLICY" && ADDED_POLICY=1
    fi
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx) >&2 \
      || log "nginx install failed; skipping the nginx row"
    [[ $ADDED_POLICY == 1 ]] && rm -f "$POLICY"
  fi
  NGINX=$(command -v nginx || true)
  [[ -z $NGINX ]] && log "nginx not installed: skipping its row (pass --install-nginx to add it)"
fi

# ---------------------------------------------------------------- start the servers
SIM_PORT=$(free_port)
SIM_PACE=0
[[ $MODE == stream ]] && SIM_PACE=$STREAM_MS_PER_TOKEN
"${SIM_ARGV[@]}" --listen "127.0.0.1:$SIM_PORT" --latency-ms 0 --ms-per-token "$SIM_PACE" \
  >"$TMP/sim.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$SIM_PORT/v1/models" "simulator" "$TMP/sim.log"

# with_workers CONFIG: set server.workers to $WORKERS in a tollgate config (once; the bench
# configs have no server section of their own).
with_workers() {
  if [[ -n $WORKERS ]] && ! grep -q '^server:' "$1"; then
    printf 'server:\n  workers: %s\n' "$WORKERS" >>"$1"
  fi
}
FLOOR_WORKERS=()
[[ -n $WORKERS ]] && FLOOR_WORKERS=(--workers "$WORKERS")
# The proxy processes by target name (tollgate rows and floors), for their context switches.
declare -A PIDOF

GW_PORT=""
if [[ $USE_GATEWAY == 1 ]]; then
  GW_PORT=$(free_port)
  ADMIN_PORT=$(free_port)
  sed -e "s/127\.0\.0\.1:8080/127.0.0.1:$GW_PORT/" \
      -e "s/127\.0\.0\.1:9901/127.0.0.1:$ADMIN_PORT/" \
      -e "s/127\.0\.0\.1:8000/127.0.0.1:$SIM_PORT/" \
      "$ROOT/bench/quickstart-bench.yaml" >"$TMP/tollgate.yaml"
  if [[ $ACCESS_LOG == 1 ]]; then
    sed -i -e 's/access_log: false/access_log: true/' "$TMP/tollgate.yaml"
  fi
  with_workers "$TMP/tollgate.yaml"
  "$TOLLGATE" serve -c "$TMP/tollgate.yaml" >"$TMP/tollgate.log" 2>&1 &
  PIDS+=($!)
  PIDOF[tollgate]=$!
  wait_http "http://127.0.0.1:$ADMIN_PORT/healthz" "tollgate" "$TMP/tollgate.log"
fi

# start_gateway NAME CONFIG: another tollgate on free ports; sets GWPORT[NAME].
declare -A GWPORT
start_gateway() {
  local name=$1 cfg=$2 port admin
  port=$(free_port); admin=$(free_port)
  sed -i -e "s/127\.0\.0\.1:8080/127.0.0.1:$port/" -e "s/127\.0\.0\.1:9901/127.0.0.1:$admin/" "$cfg"
  with_workers "$cfg"
  "$TOLLGATE" serve -c "$cfg" >"$TMP/$name.log" 2>&1 &
  PIDS+=($!)
  PIDOF[$name]=$!
  wait_http "http://127.0.0.1:$admin/healthz" "$name" "$TMP/$name.log"
  GWPORT[$name]=$port
}
if [[ $USE_GATEWAY == 1 && $USE_REDIS == 1 ]]; then
  redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1 || die "--redis needs a Redis at $REDIS_URL"
  # redis_storage PREFIX [EXTRA]: the storage block that replaces `kind: memory`, as a sed
  # replacement (`\n` for each new line; EXTRA is written the same way).
  redis_storage() {
    printf '  kind: redis\\n  redis:\\n    url: %s\\n    key_prefix: %s\\n    timeout: 200ms%s' \
      "$REDIS_URL" "$1" "${2:-}"
  }
  sed -e "s|^  kind: memory|$(redis_storage "tgbench-$$")|" \
      "$TMP/tollgate.yaml" >"$TMP/tollgate-redis.yaml"
  sed -i -e "s/127\.0\.0\.1:$GW_PORT/127.0.0.1:8080/" -e "s/127\.0\.0\.1:$ADMIN_PORT/127.0.0.1:9901/" "$TMP/tollgate-redis.yaml"
  start_gateway tollgate-redis "$TMP/tollgate-redis.yaml"
  sed -e "s|^  kind: memory|$(redis_storage "tgbench-$$-batch" '\n    batching: { flush_interval: 5ms }')|" \
      "$TMP/tollgate.yaml" >"$TMP/tollgate-redis-batch.yaml"
  sed -i -e "s/127\.0\.0\.1:$GW_PORT/127.0.0.1:8080/" -e "s/127\.0\.0\.1:$ADMIN_PORT/127.0.0.1:9901/" "$TMP/tollgate-redis-batch.yaml"
  start_gateway tollgate-redis-batch "$TMP/tollgate-redis-batch.yaml"
fi
if [[ $USE_GATEWAY == 1 && $USE_JWT == 1 ]]; then
  FIX="$ROOT/crates/tollgate/tests/fixtures/jwt"
  {
    printf 'listen: 127.0.0.1:8080\nadmin:\n  listen: 127.0.0.1:9901\nlogging:\n  level: warn\n  access_log: false\n'
    printf 'backends:\n  - name: sim\n    url: http://127.0.0.1:%s\n' "$SIM_PORT"
    printf 'routes:\n  - name: llm\n    match: { path_prefix: /v1 }\n    backend: sim\n'
    printf 'auth:\n  jwt:\n    providers:\n      - name: selfminted\n        issuer: solo.io\n        public_key_pem: |\n'
    sed 's/^/          /' "$FIX/alice.pub.pem"
    printf 'policies:\n  - name: tiers\n    kind: TokenRateLimitPolicy\n    limits:\n      user:\n'
    printf '        rates: [{ limit: 1000000000000, window: 1m }, { limit: 1000000000000, window: 1h }, { limit: 1000000000000, window: 1d }]\n'
    printf '        counters: [auth.identity.sub]\n'
  } >"$TMP/tollgate-jwt.yaml"
  start_gateway tollgate-jwt "$TMP/tollgate-jwt.yaml"
fi

NGINX_PORT=""
if [[ -n $NGINX ]]; then
  NGINX_PORT=$(free_port)
  mkdir -p "$TMP/nginx/tmp"
  chmod -R a+rwx "$TMP/nginx"
  chmod a+rx "$TMP"
  if [[ $ACCESS_LOG == 1 ]]; then NGINX_ACCESS="access_log $TMP/nginx/access.log;"; else NGINX_ACCESS="access_log off;"; fi
  # SSE must be passed on as it comes; plain JSON keeps nginx's default buffering.
  if [[ $MODE == stream ]]; then NGINX_BUFFERING="proxy_buffering off;"; else NGINX_BUFFERING=""; fi
  cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes auto;
daemon off;
master_process on;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
  $NGINX_ACCESS
  client_body_temp_path $TMP/nginx/tmp/body;
  proxy_temp_path $TMP/nginx/tmp/proxy;
  fastcgi_temp_path $TMP/nginx/tmp/fastcgi;
  uwsgi_temp_path $TMP/nginx/tmp/uwsgi;
  scgi_temp_path $TMP/nginx/tmp/scgi;
  keepalive_requests 1000000;
  upstream sim {
    server 127.0.0.1:$SIM_PORT;
    keepalive 128;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      $NGINX_BUFFERING
    }
  }
}
EOF
  NGINX_FLAGS=(-p "$TMP/nginx/" -c "$TMP/nginx/nginx.conf")
  if "$NGINX" -h 2>&1 | grep -q -- ' -e '; then NGINX_FLAGS+=(-e "$TMP/nginx/error.log"); fi
  "$NGINX" "${NGINX_FLAGS[@]}" >"$TMP/nginx.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$NGINX_PORT/v1/models" "nginx" "$TMP/nginx/error.log"
fi

if [[ $USE_GATEWAY == 1 && $USE_FLOORS == 1 ]]; then
  # The quickstart bench config without its auth and policies sections.
  sed -e '/^auth:/,$d' -e "s/127\.0\.0\.1:8000/127.0.0.1:$SIM_PORT/" \
    "$ROOT/bench/quickstart-bench.yaml" >"$TMP/tollgate-plain.yaml"
  start_gateway tollgate-plain "$TMP/tollgate-plain.yaml"
fi
FLOOR_PORT=""
if [[ $USE_FLOORS == 1 ]]; then
  FLOOR_PORT=$(free_port)
  "$FLOOR" --listen "127.0.0.1:$FLOOR_PORT" --upstream "127.0.0.1:$SIM_PORT" "${FLOOR_WORKERS[@]}" >"$TMP/floor.log" 2>&1 &
  PIDS+=($!)
  PIDOF[floor]=$!
  wait_http "http://127.0.0.1:$FLOOR_PORT/v1/models" "tollgate-floor" "$TMP/floor.log"
fi
FLOOR_REDIS_PORT=""
if [[ $USE_FLOORS == 1 && $USE_REDIS == 1 ]]; then
  FLOOR_REDIS_PORT=$(free_port)
  "$FLOOR" --listen "127.0.0.1:$FLOOR_REDIS_PORT" --upstream "127.0.0.1:$SIM_PORT" "${FLOOR_WORKERS[@]}" \
    --redis "$REDIS_URL" --redis-key "tgbench-$$-floor" >"$TMP/floor-redis.log" 2>&1 &
  PIDS+=($!)
  PIDOF[floor-redis]=$!
  wait_http "http://127.0.0.1:$FLOOR_REDIS_PORT/v1/models" "tollgate-floor --redis" "$TMP/floor-redis.log"
fi

# ---------------------------------------------------------------- requests
if [[ $MODE == stream ]]; then
  BODY="{\"model\":\"sim\",\"messages\":[{\"role\":\"user\",\"content\":\"Tell me a long story about a toll gate\"}],\"max_tokens\":$STREAM_TOKENS,\"stream\":true,\"stream_options\":{\"include_usage\":true}}"
  C=$STREAM_CONCURRENCY
  STREAM_FLAG=(--stream)
else
  BODY='{"model":"sim","messages":[{"role":"user","content":"Say hello to the benchmark"}],"max_tokens":16}'
  C=$CONCURRENCY
  STREAM_FLAG=()
fi
PATH_=/v1/chat/completions

# Refuse to measure a target that does not answer 200 (e.g. a config problem).
check_target() {
  local name=$1 url=$2 code
  code=$(curl -s -o "$TMP/check.out" -w '%{http_code}' -H "$(auth_for "$name")" \
    -H 'content-type: application/json' --data "$BODY" "$url" || true)
  if [[ $code != 200 ]]; then
    log "---- response of $name ($code):"
    head -c 600 "$TMP/check.out" >&2 || true
    log ""
    die "$name does not answer 200 at $url"
  fi
}

TARGETS=(direct)
declare -A URL=([direct]="http://127.0.0.1:$SIM_PORT$PATH_")
declare -A LABEL=([direct]="direct (tollgate sim)" [tollgate]="tollgate (quickstart policies)" [nginx]="nginx (reverse proxy)" [tollgate-redis]="tollgate on Redis" [tollgate-redis-batch]="tollgate on Redis, batching" [tollgate-jwt]="tollgate JWT + 3 tiers" [tollgate-plain]="tollgate, no auth/policies" [floor]="hyper floor (tollgate-floor)" [floor-redis]="hyper floor + 1 Redis read")
declare -A AUTHH
if [[ -n $GW_PORT ]]; then TARGETS+=(tollgate); URL[tollgate]="http://127.0.0.1:$GW_PORT$PATH_"; fi
for g in tollgate-redis tollgate-redis-batch tollgate-jwt; do
  if [[ -n ${GWPORT[$g]:-} ]]; then TARGETS+=("$g"); URL[$g]="http://127.0.0.1:${GWPORT[$g]}$PATH_"; fi
done
if [[ -n ${GWPORT[tollgate-jwt]:-} ]]; then
  AUTHH[tollgate-jwt]="Authorization: Bearer $(tr -d '\n' <"$ROOT/crates/tollgate/tests/fixtures/jwt/alice.jwt")"
fi
auth_for() { printf '%s' "${AUTHH[$1]:-$AUTH_HEADER}"; }
if [[ -n $NGINX_PORT ]]; then TARGETS+=(nginx); URL[nginx]="http://127.0.0.1:$NGINX_PORT$PATH_"; fi
if [[ -n ${GWPORT[tollgate-plain]:-} ]]; then TARGETS+=(tollgate-plain); URL[tollgate-plain]="http://127.0.0.1:${GWPORT[tollgate-plain]}$PATH_"; fi
if [[ -n $FLOOR_PORT ]]; then TARGETS+=(floor); URL[floor]="http://127.0.0.1:$FLOOR_PORT$PATH_"; fi
if [[ -n $FLOOR_REDIS_PORT ]]; then TARGETS+=(floor-redis); URL[floor-redis]="http://127.0.0.1:$FLOOR_REDIS_PORT$PATH_"; fi
for t in "${TARGETS[@]}"; do check_target "$t" "${URL[$t]}"; done

# ---------------------------------------------------------------- measuring
# field JSON KEY / nested JSON OBJECT KEY: numbers out of tollgate-load's one-line report.
field() { sed -nE "s/.*\"$2\":([0-9.]+).*/\1/p" <<<"$1"; }
nested() { sed -nE "s/.*\"$2\":\{[^}]*\"$3\":([0-9.]+).*/\1/p" <<<"$1"; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

# cpu_ticks: "busy total" jiffies of the whole machine, from /proc/stat.
cpu_ticks() {
  local _c u n s i w x y z _rest
  read -r _c u n s i w x y z _rest </proc/stat
  echo "$((u + n + s + x + y + z)) $((u + n + s + i + w + x + y + z))"
}

# ctx_switches PID: context switches (voluntary + involuntary) of every thread of PID so far.
ctx_switches() {
  cat /proc/"$1"/task/*/status 2>/dev/null |
    awk '/^(non)?voluntary_ctxt_switches:/ { n += $2 } END { print n + 0 }'
}
now_ns() { date +%s%N; }

declare -A RPS P50 P99 TTFB50 TTFB99 BAD BUSY CTX
# Each run's figures until `summarize` takes their medians: RAW[KEY.FIGURE] is a
# space-separated list; `add` appends to one, `runs_median` reads one.
declare -A RAW
add() { RAW[$1.$2]+=" $3"; }
runs_median() { median ${RAW[$1.$2]}; } # the list is numbers, split into arguments on purpose
# run_once KEY URL RATE RUN: run RUN of KEY (closed loop when RATE is empty), its figures
# added under KEY; busy is how many of the machine's cores were busy during it (every
# process: load generator, proxy, simulator, Redis), so a fixed-load figure taken on a
# saturated box reads as such.
run_once() {
  local key=$1 url=$2 rate=$3 run=$4 line ok req err
  local rate_args=() t0 t1 pid=${PIDOF[${key#*_}]:-} c0 c1 w0 w1
  [[ -n $rate ]] && rate_args=(--rate "$rate")
  t0=$(cpu_ticks)
  [[ -n $pid ]] && { c0=$(ctx_switches "$pid"); w0=$(now_ns); }
  line=$("$LOAD" --url "$url" --body "$BODY" -H "$(auth_for "${key#*_}")" -c "$C" -d "$DURATION" \
    --warmup "$WARMUP" --threads "$LOAD_THREADS" "${rate_args[@]}" "${STREAM_FLAG[@]}")
  t1=$(cpu_ticks)
  [[ -n $pid ]] && { c1=$(ctx_switches "$pid"); w1=$(now_ns); }
  add "$key" busy "$(awk -v a="$t0" -v b="$t1" -v n="$cores" 'BEGIN { split(a, x, " "); split(b, y, " ");
    d = y[2] - x[2]; printf "%.2f", (d > 0 ? n * (y[1] - x[1]) / d : 0) }')"
  echo "$key run $run: $line" >>"$TMP/runs.log"
  add "$key" rps "$(field "$line" rps)"
  # Per request: the switch rate over the whole run (warm-up included) over the
  # measured request rate.
  [[ -n $pid ]] && add "$key" ctx "$(awk -v c="$((c1 - c0))" -v w="$((w1 - w0))" -v r="$(field "$line" rps)" \
    'BEGIN { printf "%.2f", (w > 0 && r > 0 ? c / (w / 1e9) / r : 0) }')"
  add "$key" p50 "$(nested "$line" latency_us p50)"
  add "$key" p99 "$(nested "$line" latency_us p99)"
  if [[ $MODE == stream ]]; then
    add "$key" t50 "$(nested "$line" ttfb_us p50)"
    add "$key" t99 "$(nested "$line" ttfb_us p99)"
  fi
  req=$(field "$line" requests); err=$(field "$line" errors)
  ok=$(nested "$line" status 200); ok=${ok:-0}
  add "$key" bad "$((req - ok + err + $(field "$line" not_sent)))"
  log "  $key run $run: $(field "$line" rps) req/s, p50 $(nested "$line" latency_us p50) us, p99 $(nested "$line" latency_us p99) us"
}
# summarize KEY: the medians of KEY's runs.
summarize() {
  local key=$1
  RPS[$key]=$(runs_median "$key" rps)
  P50[$key]=$(runs_median "$key" p50)
  P99[$key]=$(runs_median "$key" p99)
  BAD[$key]=$(runs_median "$key" bad)
  BUSY[$key]=$(runs_median "$key" busy)
  CTX[$key]=-
  [[ -n ${RAW[$key.ctx]:-} ]] && CTX[$key]=$(runs_median "$key" ctx)
  if [[ $MODE == stream ]]; then
    TTFB50[$key]=$(runs_median "$key" t50)
    TTFB99[$key]=$(runs_median "$key" t99)
  fi
}
# measure ROUNDS PREFIX RATE TARGET...: ROUNDS rounds, each running every TARGET once at
# RATE (closed loop when empty), medians stored under PREFIX_TARGET. The targets take
# turns so that what the box does over the minutes a table takes (other work, the host)
# falls on every target alike instead of on whichever ran last: the figures are compared
# with each other.
measure() {
  local rounds=$1 prefix=$2 rate=$3 i t
  shift 3
  for i in $(seq 1 "$rounds"); do
    for t in "$@"; do run_once "${prefix}_$t" "${URL[$t]}" "$rate" "$i/$rounds"; done
  done
  for t in "$@"; do summarize "${prefix}_$t"; done
}

cores=$(nproc 2>/dev/null || echo "?")
log "measuring: $MODE mode, ${RUNS} runs x (${WARMUP} warm-up + ${DURATION}) per figure, $cores cores shared by all processes"

if [[ $MODE == table ]]; then
  log "saturation (c=$C), in turns: ${TARGETS[*]}..."
  measure "$RUNS" sat "" "${TARGETS[@]}"
  RATE=$(awk -v r="${RPS[sat_direct]}" 'BEGIN { printf "%d", r / 4 }')
  [[ $RATE -ge 1 ]] || RATE=1
  log "fixed load $RATE req/s, in turns: ${TARGETS[*]}..."
  measure "$RUNS" fix "$RATE" "${TARGETS[@]}"
  # Memory vs Redis at loads both can hold (the quarter-of-direct load above may be more
  # than the Redis row sustains on a small box): half and a quarter of the Redis row's
  # saturation. At half, every process on this shared box together may already keep
  # both cores busy (the "box CPU" column says), and p99 then measures the contention.
  # More rounds than RUNS: differences of p99 are what is read here, and a p99 on this
  # box drifts by milliseconds over minutes.
  if [[ -n ${GWPORT[tollgate-redis]:-} && -n $GW_PORT ]]; then
    if [[ -n ${REDIS_RATE:-} ]]; then
      read -r -a RRATES <<<"$REDIS_RATE"
    else
      RRATES=("$(awk -v r="${RPS[sat_tollgate-redis]}" 'BEGIN { printf "%d", r / 2 }')"
              "$(awk -v r="${RPS[sat_tollgate-redis]}" 'BEGIN { printf "%d", r / 4 }')")
    fi
    RPAIR=(tollgate tollgate-redis)
    [[ -n ${GWPORT[tollgate-redis-batch]:-} ]] && RPAIR+=(tollgate-redis-batch)
    [[ -n $FLOOR_REDIS_PORT ]] && RPAIR+=(floor floor-redis)
    for j in "${!RRATES[@]}"; do
      [[ ${RRATES[$j]} -ge 1 ]] || RRATES[$j]=1
      log "fixed load ${RRATES[$j]} req/s (memory vs Redis), in turns: ${RPAIR[*]}..."
      measure "$REDIS_RUNS" "fixr${j}" "${RRATES[$j]}" "${RPAIR[@]}"
    done
  fi

  echo
  echo "tollgate end-to-end benchmark: POST $PATH_ (non-streaming, max_tokens 16), simulator latency 0"
  echo "median of $RUNS runs x $DURATION (after $WARMUP warm-up), the targets taking turns; $C connections; load generator threads: $LOAD_THREADS; cores: $cores; proxy threads: ${WORKERS:-one per core}"
  echo "req/s is the throughput achieved; failed/unsent = non-2xx + transport errors + requests due but never sent"
  echo
  printf '%-32s %-24s %10s %10s %10s %12s %6s\n' "target" "load" "req/s" "p50 us" "p99 us" "p50 vs direct" "failed/unsent"
  printf '%-32s %-24s %10s %10s %10s %12s %6s\n' "------" "----" "-----" "------" "------" "-------------" "-------------"
  for phase in sat fix; do
    if [[ $phase == sat ]]; then load="saturation (c=$C)"; else load="fixed $RATE req/s"; fi
    for t in "${TARGETS[@]}"; do
      k=${phase}_$t
      delta=$(awk -v a="${P50[$k]}" -v b="${P50[${phase}_direct]}" 'BEGIN { d = a - b; printf (d >= 0 ? "+%d us" : "%d us"), d }')
      [[ $t == direct ]] && delta="-"
      printf '%-32s %-24s %10s %10s %10s %12s %6s\n' "${LABEL[$t]}" "$load" "${RPS[$k]}" "${P50[$k]}" "${P99[$k]}" "$delta" "${BAD[$k]}"
    done
  done
  if [[ -n ${RRATES:-} ]]; then
    echo
    echo "memory vs Redis counters (same policies; Redis at $REDIS_URL;"
    echo "median of $REDIS_RUNS runs per target, the targets taking turns;"
    echo "box CPU = cores busy during the run, every process together, of $cores;"
    echo "switches = context switches of the proxy's threads per request):"
    printf '%-32s %-24s %10s %10s %10s %8s %8s %6s\n' "target" "load" "req/s" "p50 us" "p99 us" "box CPU" "switches" "failed/unsent"
    for j in "${!RRATES[@]}"; do
      for t in "${RPAIR[@]}"; do
        k=fixr${j}_$t
        printf '%-32s %-24s %10s %10s %10s %8s %8s %6s\n' "${LABEL[$t]}" "fixed ${RRATES[$j]} req/s" "${RPS[$k]}" "${P50[$k]}" "${P99[$k]}" "${BUSY[$k]}" "${CTX[$k]}" "${BAD[$k]}"
      done
    done
    printf 'proxy context switches per request at saturation: memory %s, Redis %s\n' \
      "${CTX[sat_tollgate]}" "${CTX[sat_tollgate-redis]}"
    awk -v rs="${RPS[sat_tollgate-redis]}" -v ms="${RPS[sat_tollgate]}" 'BEGIN {
      printf "Redis keeps %.1f%% of memory-mode throughput at saturation\n", 100 * rs / ms }'
    if [[ -n ${GWPORT[tollgate-redis-batch]:-} ]]; then
      awk -v rs="${RPS[sat_tollgate-redis-batch]}" -v ms="${RPS[sat_tollgate]}" 'BEGIN {
        printf "with batching (5ms, cached reads) Redis keeps %.1f%% of memory-mode throughput\n", 100 * rs / ms }'
    fi
    for j in "${!RRATES[@]}"; do
      awk -v rate="${RRATES[$j]}" \
          -v r50="${P50[fixr${j}_tollgate-redis]}" -v m50="${P50[fixr${j}_tollgate]}" \
          -v r99="${P99[fixr${j}_tollgate-redis]}" -v m99="${P99[fixr${j}_tollgate]}" 'BEGIN {
        printf "at %d req/s Redis adds %+d us at p50, %+d us at p99", rate, r50 - m50, r99 - m99 }'
      if [[ -n ${GWPORT[tollgate-redis-batch]:-} ]]; then
        awk -v r50="${P50[fixr${j}_tollgate-redis-batch]}" -v m50="${P50[fixr${j}_tollgate]}" \
            -v r99="${P99[fixr${j}_tollgate-redis-batch]}" -v m99="${P99[fixr${j}_tollgate]}" 'BEGIN {
          printf "; batching %+d / %+d us", r50 - m50, r99 - m99 }'
      fi
      if [[ -n $FLOOR_REDIS_PORT ]]; then
        awk -v r50="${P50[fixr${j}_floor-redis]}" -v m50="${P50[fixr${j}_floor]}" \
            -v r99="${P99[fixr${j}_floor-redis]}" -v m99="${P99[fixr${j}_floor]}" 'BEGIN {
          printf "; the hyper floor'"'"'s one Redis read %+d / %+d us", r50 - m50, r99 - m99 }'
      fi
      echo
    done
  fi
else
  log "stream (c=$C), in turns: ${TARGETS[*]}..."
  measure "$RUNS" str "" "${TARGETS[@]}"
  echo
  echo "tollgate streaming overhead: POST $PATH_ stream=true include_usage, $STREAM_TOKENS tokens (ms_per_token $SIM_PACE)"
  echo "median of $RUNS runs x $DURATION (after $WARMUP warm-up), the targets taking turns; $C connections; load generator threads: $LOAD_THREADS; cores: $cores; proxy threads: ${WORKERS:-one per core}"
  echo
  printf '%-32s %10s %12s %12s %12s %12s %6s\n' "target" "streams/s" "TTFB p50 us" "TTFB p99 us" "total p50 us" "total p99 us" "failed/unsent"
  printf '%-32s %10s %12s %12s %12s %12s %6s\n' "------" "---------" "-----------" "-----------" "------------" "------------" "-------------"
  for t in "${TARGETS[@]}"; do
    k=str_$t
    printf '%-32s %10s %12s %12s %12s %12s %6s\n' "${LABEL[$t]}" "${RPS[$k]}" "${TTFB50[$k]}" "${TTFB99[$k]}" "${P50[$k]}" "${P99[$k]}" "${BAD[$k]}"
  done
fi
echo

# With --redis: how exactly one budget holds across replicas (the accuracy bench: 50
# concurrent clients against a 1,000-token budget, one gateway and three on Redis).
if [[ $MODE == table && $USE_REDIS == 1 ]]; then
  if [[ $BUILD == 1 ]]; then
    echo "tokens admitted ÷ limit (cargo bench -p tollgate --bench accuracy):"
    (cd "$ROOT" && REDIS_URL="$REDIS_URL" cargo bench -q -p tollgate --bench accuracy 2>/dev/null) || log "accuracy bench failed"
  else
    log "--no-build: skipping the accuracy bench (cargo bench -p tollgate --bench accuracy)"
  fi
fi
