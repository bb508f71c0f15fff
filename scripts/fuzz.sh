#!/usr/bin/env bash
# Coverage-guided fuzzing of the input parsers, on the stable toolchain: cargo-fuzz with
# `--sanitizer none` (libFuzzer with sancov instrumentation needs no nightly flag; the
# address sanitizer would). Targets live in fuzz/fuzz_targets (see each file's header for
# its invariants): sse_meter, usage, request, config, jwt.
#
#   ./scripts/fuzz.sh                  # every target, about 60 s of fuzzing in all
#   FUZZ_SECONDS=600 ./scripts/fuzz.sh # longer
#   FUZZ_OPT_LEVEL=3 FUZZ_SECONDS=3600 ./scripts/fuzz.sh   # a long run: optimised build
#   ./scripts/fuzz.sh jwt config       # some targets
#
# Builds into $CARGO_TARGET_DIR/fuzz (default target/fuzz); the growing corpus and any
# crash artifacts stay there too (corpus/<target>, artifacts/<target>). Seeds: fuzz/seeds,
# the captured upstream responses in ../shared/corpus when present, examples/*.yaml.
# A crash fails the script and prints the input; reproduce with
#   CARGO_PROFILE_RELEASE_OPT_LEVEL=0 cargo fuzz run --sanitizer none -O -a \
#     --codegen-units 16 --fuzz-dir fuzz --target-dir target/fuzz TARGET FILE
# and turn it into a regression test in the crate's own suite.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
target_dir="${CARGO_TARGET_DIR:-$root/target}/fuzz"
work="$target_dir/work"
total=${FUZZ_SECONDS:-60}

all_targets=(sse_meter usage request config jwt)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install --locked cargo-fuzz --version 0.13.2
fi
# The fuzz workspace builds with exactly the main workspace's locked versions (the lint
# stage checks that lock with --locked): its lock is the main one, plus the fuzz-only
# crates (libfuzzer-sys, pinned in fuzz/Cargo.toml, and what it needs). Generated here,
# not kept in git, so it can never drift from the main lock.
cp Cargo.lock fuzz/Cargo.lock
cargo metadata --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null

# Debug assertions and overflow checks on (an overflow is a crash too). The build, not the
# minute of fuzzing, is what a CI run pays for: every crate of the gateway, instrumented,
# in a target dir of its own. On two cores it took 7.6 min at opt-level 3 and 3.4 min at
# opt-level 0, where a 12 s run executes 7-75x fewer inputs (a smoke run); so opt-level 0
# unless FUZZ_OPT_LEVEL says otherwise (use 3 for long runs). 16 codegen units, line tables.
export CARGO_PROFILE_RELEASE_OPT_LEVEL=${FUZZ_OPT_LEVEL:-0}
fuzz() {
  cargo fuzz "$1" --sanitizer none --fuzz-dir fuzz --target-dir "$target_dir" \
    -O --debug-assertions --codegen-units 16 "${@:2}"
}

echo "== building fuzz targets (stable, --sanitizer none)"
fuzz build

# Seeds: each target's input starts with a mode byte (API and options, see the target).
seeds="$work/seeds"
rm -rf "$seeds"
mkdir -p "$seeds"/{sse_meter,usage,request,config,jwt}
shared="$root/../shared/corpus"
api_byte() { # Api::ALL order: chat, completions, responses, embeddings, messages
  case "$(basename "$(dirname "$1")")/$(basename "$1")" in
    *chat*|*azure*|*vllm*) echo 0 ;; *completions*) echo 1 ;; *responses*) echo 2 ;;
    *embeddings*) echo 3 ;; *messages*|*anthropic*) echo 4 ;; *) echo 0 ;;
  esac
}
with_mode() { # with_mode MODE FILE OUT: the mode byte, three chunk-size bytes, the file
  { printf "\\$(printf '%03o' "$1")\\005\\021\\003"; cat "$2"; } >"$3"
}
n=0
add_stream() {
  local api; api=$(api_byte "$1")
  for opts in 0 8 16 32; do # plain, strip usage chunk, aligned, small event bound
    n=$((n + 1)); with_mode $((api | opts)) "$1" "$seeds/sse_meter/$n"
  done
}
add_body() {
  local api; api=$(api_byte "$1")
  n=$((n + 1)); with_mode "$api" "$1" "$seeds/usage/$n"
}
if [ -d "$shared" ]; then
  while IFS= read -r f; do add_stream "$f"; done < <(find "$shared" -name '*.sse')
  while IFS= read -r f; do add_body "$f"; done < <(find "$shared" -name '*.json')
fi
for f in fuzz/seeds/sse/*; do add_stream "$f"; done
for f in fuzz/seeds/usage/*; do add_body "$f"; done
for f in fuzz/seeds/request/*; do
  n=$((n + 1)); with_mode "$(api_byte "$f")" "$f" "$seeds/request/$n"
done
cp examples/*.yaml "$seeds/config/"
cp fuzz/seeds/jwt/*.jwt "$seeds/jwt/"

per=$(( total / ${#targets[@]} ))
[ "$per" -ge 1 ] || per=1
status=0
for t in "${targets[@]}"; do
  corpus="$work/corpus/$t"
  artifacts="$work/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  echo "== fuzz $t for ${per}s"
  if ! fuzz run "$t" "$corpus" "$seeds/$t" -- \
      -max_total_time="$per" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      -artifact_prefix="$artifacts" -print_final_stats=1 >"$work/$t.log" 2>&1; then
    status=1
    echo "!! $t failed (log: $work/$t.log)"
    grep -E "panicked at|ERROR: libFuzzer|SUMMARY|Test unit written" "$work/$t.log" | head -20 || true
    for a in "$artifacts"*; do
      [ -f "$a" ] || continue
      if [ "$(stat -c %s "$a")" -le 4096 ]; then
        echo "-- $a (base64):"; base64 -w0 "$a"; echo
      else
        echo "-- $a ($(stat -c %s "$a") bytes)"
      fi
    done
  else
    grep -E "stat::number_of_executed_units|stat::new_units_added" "$work/$t.log" \
      | tr '\n' ' ' | sed "s/^/   $t: /"; echo
  fi
done
exit $status
