# bench/lib.sh: what the benchmark scripts share. Sourced after the script has set SCRIPT
# (its name, for messages), ROOT, BUILD and, optionally, KEEP.
#
# Gives: log, die, a temporary directory $TMP removed on exit (kept with KEEP=1), PIDS
# (processes stopped on exit), free_port, wait_http URL NAME LOGFILE, start_sim (the
# built-in simulator on a free port: $SIM_PORT), and, when BUILD=1, a release build of
# tollgate and tollgate-bench.

log() { printf '%s\n' "$*" >&2; }
die() { log "$SCRIPT: $*"; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-${SCRIPT%.sh}.XXXXXX")
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ ${KEEP:-0} == 1 ]]; then log "logs kept in $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A port nothing listens on, from below the kernel's ephemeral range (see load.sh).
free_port() {
  local p i lo=10000 hi=32768
  [[ -r /proc/sys/net/ipv4/ip_local_port_range ]] && read -r hi _ </proc/sys/net/ipv4/ip_local_port_range
  ((hi > lo + 1000)) || { lo=20000; hi=60000; }
  for i in $(seq 1 100); do
    p=$((lo + RANDOM % (hi - lo)))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  die "no free port found"
}
wait_http() {
  local url=$1 name=$2 logfile=$3 i
  for i in $(seq 1 200); do
    curl -sf -o /dev/null "$url" 2>/dev/null && return 0
    sleep 0.05
  done
  tail -n 30 "$logfile" >&2 || true
  die "$name did not become ready at $url"
}

# The built-in simulator (no latency, no pacing) on a free port, ready: sets SIM_PORT.
start_sim() {
  SIM_PORT=$(free_port)
  "$BIN/tollgate" sim --listen "127.0.0.1:$SIM_PORT" --latency-ms 0 --ms-per-token 0 \
    >"$TMP/sim.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$SIM_PORT/v1/models" simulator "$TMP/sim.log"
}

command -v curl >/dev/null || die "curl is required"
if [[ $BUILD == 1 ]]; then
  log "building release binaries (cargo build --release -p tollgate -p tollgate-bench)..."
  (cd "$ROOT" && cargo build --release -q -p tollgate -p tollgate-bench)
fi
