#!/usr/bin/env bash
# Relay benchmark with Postfix's own tools, compared in one run:
#   smtp-source -s S -m M -l L -r R -d  ->  smtp-sink                                 (direct)
#   smtp-source -s S -m M -l L -r R -d  ->  sluice --fsync always --relay-host  ->  smtp-sink
# End to end means from smtp-source's first connection until the relay has logged a delivery
# for every recipient. Relay CPU is utime+stime of the sluice process over that span.
# Usage: benches/relay.sh [MESSAGES=20000] [SESSIONS=20] [SIZE=1024] [RCPTS=1] [RUNS=3]
# Needs Debian's postfix package (smtp-source, smtp-sink) and python3. Loopback only: the relay
# gets --dns pointing at a sluice-load dns started here; every process started is stopped by PID.
set -euo pipefail
M=${1:-20000}; S=${2:-20}; L=${3:-1024}; R=${4:-1}; RUNS=${5:-3}
cd "$(dirname "$0")/.."
cargo build --release -q --workspace
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=${SLUICE_BIN:-$TARGET/release/sluice}  # SLUICE_BIN: another build to measure
LOAD=$TARGET/release/sluice-load
WORK=$(mktemp -d /tmp/sluice-relay-bench.XXXXXX)
PIDS=()
# shellcheck source=benches/lib.sh
source "$PWD/benches/lib.sh"
trap cleanup EXIT
TCK=$(getconf CLK_TCK)
TOTAL=$((M * R))

source_to() { smtp-source -s "$S" -m "$M" -l "$L" -r "$R" -d -f sender@bench.test -t rcpt@dest.test "127.0.0.1:$1"; }

DNS_PORT=$(free_port)
"$LOAD" dns --listen "127.0.0.1:$DNS_PORT" --zone dest.test=127.0.0.1 2>"$WORK/dns.log" & PIDS+=("$!")
wait_port "$DNS_PORT"

direct=(); sink_cpu=(); relay=(); accept=(); cpu_us=()
for run in $(seq "$RUNS"); do
  P=$(free_port)
  smtp-sink -u nobody "127.0.0.1:$P" 1000 & SINK=$!; PIDS+=("$SINK"); wait_port "$P"
  c0=$(cpu_ticks "$SINK")
  t0=$(now); source_to "$P"; t1=$(now)
  c1=$(cpu_ticks "$SINK")
  stop "$SINK"
  sink_cpu+=("$(echo "($c1 - $c0) * 1000000 / $TCK / $M" | bc -l)")
  direct+=("$(echo "$M / ($t1 - $t0)" | bc -l)")

  Q=$(free_port); P=$(free_port); rm -rf "$WORK/spool"
  smtp-sink -u nobody "127.0.0.1:$Q" 1000 & SINK=$!; PIDS+=("$SINK"); wait_port "$Q"
  "$BIN" serve --listen "127.0.0.1:$P" --spool "$WORK/spool" --fsync always --hostname bench.test \
    --relay-host "127.0.0.1:$Q" --dns "127.0.0.1:$DNS_PORT" 2>"$WORK/relay.log" & RELAY=$!
  PIDS+=("$RELAY"); wait_port "$P"
  c0=$(cpu_ticks "$RELAY")
  t0=$(now); source_to "$P"; ta=$(now)
  for _ in $(seq 6000); do
    n=$(grep -c 'outcome=delivered' "$WORK/relay.log" || true)
    [ "$n" -ge "$TOTAL" ] && break
    sleep 0.02
  done
  t1=$(now); c1=$(cpu_ticks "$RELAY")
  stop "$RELAY"; stop "$SINK"
  [ "$n" -eq "$TOTAL" ] || { echo "relay delivered $n of $TOTAL recipients" >&2; exit 1; }
  bad=$(grep -c 'outcome=deferred\|outcome=failed' "$WORK/relay.log" || true)
  [ "$bad" -eq 0 ] || { echo "relay deferred or failed $bad recipients" >&2; exit 1; }
  relay+=("$(echo "$M / ($t1 - $t0)" | bc -l)")
  accept+=("$(echo "$M / ($ta - $t0)" | bc -l)")
  cpu_us+=("$(echo "($c1 - $c0) * 1000000 / $TCK / $M" | bc -l)")
done

direct_m=$(printf '%s\n' "${direct[@]}" | median)
relay_m=$(printf '%s\n' "${relay[@]}" | median)
accept_m=$(printf '%s\n' "${accept[@]}" | median)
cpu_m=$(printf '%s\n' "${cpu_us[@]}" | median)
sink_cpu_m=$(printf '%s\n' "${sink_cpu[@]}" | median)
printf '\nrelay benchmark: smtp-source -s %s -m %s -l %s -r %s -d, median of %s runs\n' "$S" "$M" "$L" "$R" "$RUNS"
printf '| path | msg/s | ratio to direct | CPU us/msg (smtp-sink direct; sluice relayed) |\n|---|---|---|---|\n'
printf '| smtp-source -> smtp-sink | %.0f | 1.00 | %.1f |\n' "$direct_m" "$sink_cpu_m"
printf '| smtp-source -> sluice -> smtp-sink, end to end | %.0f | %.2f | %.1f |\n' "$relay_m" "$(echo "$relay_m / $direct_m" | bc -l)" "$cpu_m"
printf '| (smtp-source done: sluice accept rate) | %.0f | %.2f | - |\n' "$accept_m" "$(echo "$accept_m / $direct_m" | bc -l)"
printf 'per run: direct %s | end to end %s | cpu_us %s\n' "$(printf '%.0f ' "${direct[@]}")" "$(printf '%.0f ' "${relay[@]}")" "$(printf '%.1f ' "${cpu_us[@]}")"
