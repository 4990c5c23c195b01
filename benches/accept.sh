#!/usr/bin/env bash
# Accept-path benchmark, compared in one run:
#   smtp-source -s S -m M -l L -d  ->  smtp-sink            (the ceiling: a sink that stores nothing)
#   smtp-source -s S -m M -l L -d  ->  sluice --fsync always (durable spool, group commit)
#   smtp-source -s S -m M -l L -d  ->  sluice --fsync never  (same work without the disk syncs:
#                                       what the durability costs, for comparison only)
# plus the relay's RSS with 1,000 idle connections and a 10,000-connection hold test.
# Usage: benches/accept.sh [MESSAGES=20000] [SESSIONS=20] [SIZE=1024] [RUNS=3]
# Needs Debian's postfix package (smtp-source, smtp-sink) and python3. Loopback only; every
# process it starts is stopped by PID before it exits.
set -euo pipefail
M=${1:-20000}; S=${2:-20}; L=${3:-1024}; RUNS=${4:-3}
cd "$(dirname "$0")/.."
cargo build --release -q
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=${SLUICE_BIN:-$TARGET/release/sluice}  # SLUICE_BIN: another build to measure
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
WORK=$(mktemp -d /tmp/sluice-bench.XXXXXX)
PIDS=()
# shellcheck source=benches/lib.sh
source "$PWD/benches/lib.sh"
trap cleanup EXIT
TCK=$(getconf CLK_TCK)

start_relay() { # $1 port, $2 spool, $3 log, [$4 fsync policy, default always]
  "$BIN" serve --listen "127.0.0.1:$1" --spool "$2" --fsync "${4:-always}" --hostname bench.test --hold --dns 127.0.0.1:1 2>"$3" &
  RELAY=$!; PIDS+=("$RELAY"); wait_port "$1"
}

# Sets CHILD_CPU: CPU seconds of this shell's waited-for children (user + system, from `times`,
# which must run in this shell, not in a command substitution's subshell).
child_cpu() { times >"$WORK/times"; CHILD_CPU=$(awk 'NR==2 {gsub(/[ms]/, " "); print $1*60 + $2 + $3*60 + $4}' "$WORK/times"); }

# Runs smtp-source into port $1 and stops server $2 afterwards; sets RATE (msg/s), CPU (the
# server's utime+stime per message, µs) and SRC_CPU (smtp-source's, µs per message): the two
# together are what one message costs the 2-core machine.
measure() {
  local c0 c1 t0 t1 s0 s1
  c0=$(cpu_ticks "$2"); child_cpu; s0=$CHILD_CPU
  t0=$(now); smtp-source -s "$S" -m "$M" -l "$L" -d "127.0.0.1:$1"; t1=$(now)
  c1=$(cpu_ticks "$2"); child_cpu; s1=$CHILD_CPU
  stop "$2"
  RATE=$(echo "$M / ($t1 - $t0)" | bc -l)
  CPU=$(echo "($c1 - $c0) * 1000000 / $TCK / $M" | bc -l)
  SRC_CPU=$(echo "($s1 - $s0) * 1000000 / $M" | bc -l)
}

sink_rates=(); sink_cpu=(); relay_rates=(); cpu_us=(); p99s=(); never_rates=(); never_cpu=()
sink_src=(); relay_src=()
for run in $(seq "$RUNS"); do
  P=$(free_port)
  smtp-sink -u nobody "127.0.0.1:$P" 1000 & SINK=$!; PIDS+=("$SINK"); wait_port "$P"
  measure "$P" "$SINK"
  sink_rates+=("$RATE"); sink_cpu+=("$CPU"); sink_src+=("$SRC_CPU")

  P=$(free_port); rm -rf "$WORK/spool"
  start_relay "$P" "$WORK/spool" "$WORK/relay.log"
  measure "$P" "$RELAY"
  n=$(grep -c 'event=accepted' "$WORK/relay.log")
  [ "$n" -eq "$M" ] || { echo "relay accepted $n of $M messages" >&2; exit 1; }
  relay_rates+=("$RATE"); cpu_us+=("$CPU"); relay_src+=("$SRC_CPU")
  p99s+=("$(grep -o 'commit_us=[0-9]*' "$WORK/relay.log" | cut -d= -f2 | sort -n | awk '{a[NR]=$1} END {print a[int(NR*0.99)]/1000}')")

  P=$(free_port); rm -rf "$WORK/spool"
  start_relay "$P" "$WORK/spool" "$WORK/never.log" never
  measure "$P" "$RELAY"
  never_rates+=("$RATE"); never_cpu+=("$CPU")
done

# Idle connections: RSS of the relay holding 1,000 sessions that said nothing after the greeting,
# then a 10,000-connection hold (each must get its 220).
P=$(free_port); rm -rf "$WORK/spool"
start_relay "$P" "$WORK/spool" "$WORK/idle.log"
rss_before=$(awk '/VmRSS/ {print $2}' "/proc/$RELAY/status")
hold() { # $1 connections; prints how many got a 220, then holds until stdin closes
  python3 - "$P" "$1" <<'PY'
import resource, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 100, max(n + 100, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port)); socks.append(s)
ok = 0
for s in socks:
    s.settimeout(10)
    if s.recv(64).startswith(b"220"): ok += 1
print(ok, flush=True)
sys.stdin.read()
PY
}
coproc H1 { hold 1000; }
read -r idle_ok <&"${H1[0]}"
rss_idle=$(awk '/VmRSS/ {print $2}' "/proc/$RELAY/status")
eval "exec ${H1[1]}>&-"; wait "$H1_PID" 2>/dev/null || true
coproc H2 { hold 10000; }
read -r held <&"${H2[0]}"
rss_10k=$(awk '/VmRSS/ {print $2}' "/proc/$RELAY/status")
eval "exec ${H2[1]}>&-"; wait "$H2_PID" 2>/dev/null || true
stop "$RELAY"

sink_m=$(printf '%s\n' "${sink_rates[@]}" | median)
relay_m=$(printf '%s\n' "${relay_rates[@]}" | median)
cpu_m=$(printf '%s\n' "${cpu_us[@]}" | median)
sink_cpu_m=$(printf '%s\n' "${sink_cpu[@]}" | median)
p99_m=$(printf '%s\n' "${p99s[@]}" | median)
printf '\naccept benchmark: smtp-source -s %s -m %s -l %s -d, median of %s runs\n' "$S" "$M" "$L" "$RUNS"
printf '| target | msg/s | ratio to smtp-sink | server CPU us/msg | p99 end-of-data->commit ms |\n|---|---|---|---|---|\n'
printf '| smtp-sink | %.0f | 1.00 | %.1f | - |\n' "$sink_m" "$sink_cpu_m"
printf '| sluice --fsync always | %.0f | %.2f | %.1f | %.2f |\n' "$relay_m" "$(echo "$relay_m / $sink_m" | bc -l)" "$cpu_m" "$p99_m"
never_m=$(printf '%s\n' "${never_rates[@]}" | median)
printf '| sluice --fsync never (not durable) | %.0f | %.2f | %.1f | - |\n' "$never_m" "$(echo "$never_m / $sink_m" | bc -l)" "$(printf '%s\n' "${never_cpu[@]}" | median)"
printf 'per run: sink %s | sluice %s | sink cpu_us %s | sluice cpu_us %s\n' "$(printf '%.0f ' "${sink_rates[@]}")" "$(printf '%.0f ' "${relay_rates[@]}")" "$(printf '%.1f ' "${sink_cpu[@]}")" "$(printf '%.1f ' "${cpu_us[@]}")"
src_sink=$(printf '%s\n' "${sink_src[@]}" | median); src_relay=$(printf '%s\n' "${relay_src[@]}" | median)
printf 'machine CPU per message (server + smtp-source): smtp-sink %.1f + %.1f us = %.0f%% of 2 cores busy; sluice --fsync always %.1f + %.1f us = %.0f%%\n' \
  "$sink_cpu_m" "$src_sink" "$(echo "($sink_cpu_m + $src_sink) * $sink_m / 20000" | bc -l)" \
  "$cpu_m" "$src_relay" "$(echo "($cpu_m + $src_relay) * $relay_m / 20000" | bc -l)"
printf 'RSS: %s KiB at start, %s KiB with %s/1000 idle sessions, %s KiB with %s/10000 sessions held\n' "$rss_before" "$rss_idle" "$idle_ok" "$rss_10k" "$held"
