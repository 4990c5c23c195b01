#!/usr/bin/env bash
# A backlog to a suspended site, loopback only, one relay and one sink (up all along). The relay
# routes by MX (our test DNS: dest.test MX -> 127.0.0.1, --smtp-port the sink's port), so that
# the destination is the domain (with --relay-host it is the relay host, which a domain
# suspension does not reach):
# 1. `sluice queue suspend --domain dest.test` on a fresh relay, then RECIPIENTS recipients
#    (RECIPIENTS / RCPTS messages of RCPTS recipients each) injected with sluice-load send.
#    (a) Spool growth while suspended: the bytes written to the spool segments (up to the last
#        non-zero byte of each: segments are preallocated, so file sizes say nothing) right after
#        the injection and HOLD_S (30) s later, with the relay's delivery outcomes and the
#        sink's connections in between (goal: equal bytes, 0 outcomes, 0 connections).
#    (b) Memory per queued recipient: the relay's RSS after the injection minus before it,
#        divided by the recipients, both VmRSS (which includes the mapped spool pages the
#        kernel can reclaim) and RssAnon (the heap: the goal, <= 200 B).
#    (c) `sluice queue resume --domain dest.test`: recipients per second from the relay's
#        event=resume line to its last delivery (the relay's own ts= stamps; the sink says
#        when it has them all).
# 2. Baseline, an unsuspended drain of the same backlog: the same messages queued under --hold
#    on a fresh spool, the relay restarted without it, recipients per second from the restarted
#    relay's event=listening line (recovery excluded: the suspended relay had its queue in
#    memory already) to its last delivery. Goal: 1(c) >= 0.9 x 2.
# Usage: benches/suspended.sh [RECIPIENTS=1000000] [RCPTS=10] [SIZE=1024] [CONNECTIONS=20]
# Smoke test: benches/suspended.sh 20000. The spool (about RECIPIENTS / RCPTS x (SIZE + 400)
# bytes) is deleted at the end; every process started is stopped by PID. Needs python3.
set -euo pipefail
N=${1:-1000000}; R=${2:-10}; L=${3:-1024}; C=${4:-20}; HOLD_S=${HOLD_S:-30}
[ $((N % R)) -eq 0 ] || { echo "RECIPIENTS ($N) must be a multiple of RCPTS ($R)" >&2; exit 2; }
M=$((N / R))
cd "$(dirname "$0")/.."
cargo build --release -q --workspace
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=${SLUICE_BIN:-$TARGET/release/sluice}
LOAD=$TARGET/release/sluice-load
WORK=$(mktemp -d /tmp/sluice-suspended.XXXXXX)
PIDS=()
# shellcheck source=benches/lib.sh
source "$PWD/benches/lib.sh"
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true

# ts FILE PATTERN: the relay's own timestamp (ts=, seconds) of the last line matching PATTERN.
ts() { grep "$2" "$1" | tail -1 | grep -o 'ts=[0-9.]*' | cut -d= -f2; }
# Bytes written to the spool's segments: each up to its last non-zero byte.
spool_used() {
  python3 - "$1" <<'EOF'
import os, sys
total = 0
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        if not f.endswith(".spool"):
            continue
        with open(os.path.join(root, f), "rb") as fh:
            end = fh.seek(0, 2)
            while end > 0:
                start = max(0, end - (1 << 20))
                fh.seek(start)
                chunk = fh.read(end - start).rstrip(b"\0")
                if chunk:
                    end = start + len(chunk)
                    break
                end = start
        total += end
print(total)
EOF
}

DNS_PORT=$(free_port); SINK_PORT=$(free_port); RELAY_PORT=$(free_port)
"$LOAD" dns --listen "127.0.0.1:$DNS_PORT" --zone dest.test=127.0.0.1 2>"$WORK/dns.log" & PIDS+=("$!")
wait_port "$DNS_PORT"
# sink LOG: a sink on SINK_PORT that logs event=expected once it has every recipient, and its
# connection count every second.
sink() {
  "$LOAD" sink --listen "127.0.0.1:$SINK_PORT" --interval 1s --json --expect-recipients "$N" >"$WORK/sink.json" 2>"$1" &
  SINK=$!; PIDS+=("$SINK")
  wait_log "$1" "event=listening" 20  # not wait_port: its probe would count as a connection
}
relay() { # $1 log file, then extra flags
  local log=$1; shift
  "$BIN" serve --listen "127.0.0.1:$RELAY_PORT" --spool "$WORK/spool" --fsync always --hostname bench.test \
    --smtp-port "$SINK_PORT" --dns "127.0.0.1:$DNS_PORT" "$@" 2>"$log" &
  RELAY=$!; PIDS+=("$RELAY")
}
inject() {
  "$LOAD" send --to "127.0.0.1:$RELAY_PORT" --connections "$C" --messages "$M" --rcpts "$R" --size "$L" \
    --domains dest.test --quiet --json >"$WORK/send.json"
  local accepted
  accepted=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["accepted"])' "$WORK/send.json")
  [ "$accepted" -eq "$M" ] || { echo "relay accepted $accepted of $M messages" >&2; exit 1; }
}
queue() { "$BIN" queue --spool "$WORK/spool" "$@" >/dev/null; }

# 1. Suspended.
sink "$WORK/sink1.log"
relay "$WORK/relay1.log"
wait_log "$WORK/relay1.log" "event=listening" 20
queue suspend --domain dest.test --for 2h --reason bench
wait_log "$WORK/relay1.log" "event=suspend" 10
sleep 1
rss0=$(kib "$RELAY" VmRSS); anon0=$(kib "$RELAY" RssAnon)
t0=$(now); inject; t1=$(now)
sleep 2
rss1=$(kib "$RELAY" VmRSS); anon1=$(kib "$RELAY" RssAnon)
used1=$(spool_used "$WORK/spool"); out1=$(count "$WORK/relay1.log" 'outcome=')
sleep "$HOLD_S"
used2=$(spool_used "$WORK/spool"); out2=$(count "$WORK/relay1.log" 'outcome=')
conns=$(grep -o 'sink: [0-9]* connections' "$WORK/sink1.log" | tail -1 | awk '{print $2}')
queue resume --domain dest.test
wait_log "$WORK/sink1.log" "event=expected" 3600
stop "$RELAY"; stop "$SINK"
t2=$(ts "$WORK/relay1.log" 'event=resume'); t3=$(ts "$WORK/relay1.log" 'outcome=delivered')
rm -rf "$WORK/spool"

# 2. Baseline: the same backlog queued under --hold, then drained by a restarted relay.
relay "$WORK/hold.log" --hold
wait_log "$WORK/hold.log" "event=listening" 20
inject
stop "$RELAY"
sink "$WORK/sink2.log"
relay "$WORK/relay2.log"
wait_log "$WORK/sink2.log" "event=expected" 3600
stop "$RELAY"; stop "$SINK"
t4=$(ts "$WORK/relay2.log" 'event=listening'); t5=$(ts "$WORK/relay2.log" 'outcome=delivered')

drain_s=$(echo "$N / ($t3 - $t2)" | bc -l); base=$(echo "$N / ($t5 - $t4)" | bc -l)
printf '\nsuspended-site backlog: %s recipients (%s messages x %s recipients, %s bytes), %s connections\n' "$N" "$M" "$R" "$L" "$C"
printf '| measurement | figure | goal |\n|---|---|---|\n'
printf '| injection while suspended | %.0f msg/s, %.0f rcpt/s | - |\n' "$(echo "$M / ($t1 - $t0)" | bc -l)" "$(echo "$N / ($t1 - $t0)" | bc -l)"
printf '| spool bytes written: after injection / %s s later | %s / %s (%+d) | equal |\n' "$HOLD_S" "$used1" "$used2" "$((used2 - used1))"
printf '| delivery outcomes logged while suspended (after injection / %s s later) | %s / %s | 0 |\n' "$HOLD_S" "$out1" "$out2"
printf '| connections the sink saw while suspended | %s | 0 |\n' "${conns:-0}"
printf '| relay RSS per queued recipient, RssAnon (heap) | %.0f B (%s -> %s KiB) | <= 200 B |\n' "$(echo "($anon1 - $anon0) * 1024 / $N" | bc -l)" "$anon0" "$anon1"
printf '| relay RSS per queued recipient, VmRSS (with mapped spool pages) | %.0f B (%s -> %s KiB) | - |\n' "$(echo "($rss1 - $rss0) * 1024 / $N" | bc -l)" "$rss0" "$rss1"
printf '| drain after resume | %.0f rcpt/s (%.1f s) | - |\n' "$drain_s" "$(echo "$t3 - $t2" | bc -l)"
printf '| unsuspended drain of the same backlog (--hold, restart; from listening) | %.0f rcpt/s (%.1f s) | - |\n' "$base" "$(echo "$t5 - $t4" | bc -l)"
printf '| ratio resumed / unsuspended | %.2f | >= 0.9 |\n' "$(echo "$drain_s / $base" | bc -l)"
