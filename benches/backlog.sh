#!/usr/bin/env bash
# Backlog benchmark: N one-recipient messages queued while nothing is delivered (`--hold`: as
# if the destination were down, without the retry attempts a real outage adds), then the relay
# restarted with the destination up. Reports the accept rate while queueing, the relay's
# memory with the whole backlog queued, restart (recovery) time and memory, and the drain rate.
# Usage: benches/backlog.sh [MESSAGES=1000000] [SIZE=1024] [CONNECTIONS=20]
# SINK_FLAGS: extra flags for the sink (e.g. --no-chunking: the relay delivers by DATA).
# Loopback only; needs python3 for a free port. Every process started is stopped by PID; the
# spool (about MESSAGES x (SIZE + 200) bytes) is deleted at the end.
set -euo pipefail
N=${1:-1000000}; L=${2:-1024}; C=${3:-20}
cd "$(dirname "$0")/.."
cargo build --release -q --workspace
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=${SLUICE_BIN:-$TARGET/release/sluice}  # SLUICE_BIN: another build to measure
LOAD=$TARGET/release/sluice-load
WORK=$(mktemp -d /tmp/sluice-backlog.XXXXXX)
PIDS=()
# shellcheck source=benches/lib.sh
source "$PWD/benches/lib.sh"
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true


DNS_PORT=$(free_port); SINK_PORT=$(free_port); RELAY_PORT=$(free_port)
"$LOAD" dns --listen "127.0.0.1:$DNS_PORT" 2>"$WORK/dns.log" & PIDS+=("$!")
relay() { # $1 log file, then extra flags
  local log=$1; shift
  "$BIN" serve --listen "127.0.0.1:$RELAY_PORT" --spool "$WORK/spool" --fsync always --hostname bench.test \
    --relay-host "127.0.0.1:$SINK_PORT" --dns "127.0.0.1:$DNS_PORT" "$@" 2>"$log" &
  RELAY=$!; PIDS+=("$RELAY")
}

# 1. Nothing delivered (--hold; nothing listens on SINK_PORT either): everything is queued.
relay "$WORK/relay1.log" --hold
wait_log "$WORK/relay1.log" "event=listening" 20
t0=$(now)
"$LOAD" send --to "127.0.0.1:$RELAY_PORT" --connections "$C" --messages "$N" --size "$L" --quiet --json >"$WORK/send.json"
t1=$(now)
accepted=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["accepted"])' "$WORK/send.json")
[ "$accepted" -eq "$N" ] || { echo "relay accepted $accepted of $N" >&2; exit 1; }
sleep 2
rss1=$(kib "$RELAY" VmRSS); anon1=$(kib "$RELAY" RssAnon)
kill -TERM "$RELAY"; wait "$RELAY" || true
spool_mb=$(du -sm "$WORK/spool" | cut -f1)

# 2. Destination up, relay restarted on the same spool: recovery, then the drain.
# shellcheck disable=SC2086  # SINK_FLAGS is split into words on purpose
"$LOAD" sink --listen "127.0.0.1:$SINK_PORT" --interval 0 --expect-recipients "$N" ${SINK_FLAGS:-} 2>"$WORK/sink.log" & PIDS+=("$!")
wait_log "$WORK/sink.log" "event=listening" 20
t2=$(now)
relay "$WORK/relay2.log"
wait_log "$WORK/relay2.log" "event=listening" 600
t3=$(now)
rss2=$(kib "$RELAY" VmRSS); anon2=$(kib "$RELAY" RssAnon)
wait_log "$WORK/sink.log" "event=expected" 3600
t4=$(now)
sleep 1
left=$(find "$WORK/spool" -name '*.spool' | wc -l)
kill -TERM "$RELAY"; wait "$RELAY" || true

printf '\nbacklog benchmark: %s messages of %s bytes, %s connections\n' "$N" "$L" "$C"
printf 'queueing (--hold): %.0f msg/s; spool %s MB; relay RSS %s KiB (anonymous %s KiB, %.0f B per queued recipient)\n' \
  "$(echo "$N / ($t1 - $t0)" | bc -l)" "$spool_mb" "$rss1" "$anon1" "$(echo "$anon1 * 1024 / $N" | bc -l)"
printf 'restart: listening after %.2f s (recovery included); RSS %s KiB (anonymous %s KiB, %.0f B per queued recipient)\n' \
  "$(echo "$t3 - $t2" | bc -l)" "$rss2" "$anon2" "$(echo "$anon2 * 1024 / $N" | bc -l)"
printf 'drain: %.0f msg/s from restart until the sink had every recipient; spool files left afterwards: %s (the active segment stays)\n' \
  "$(echo "$N / ($t4 - $t2)" | bc -l)" "$left"
