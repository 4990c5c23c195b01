#!/usr/bin/env bash
# Commit-latency benchmark (issue: "durable commit at the device's flush latency"), in one run:
#   sluice-load disk: pwrite of BATCH bytes + fdatasync into a scratch file in the spool's
#                     directory, the file pre-written with zeros (the device's floor) and
#                     fallocated (unwritten extents, as a fresh spool segment is)
#   smtp-source -s S -m M -l L -d -> sluice --fsync always --hold: the relay's own end of data
#                     -> commit latency (`commit_us` of each `event=accepted` line)
#   sluice-load disk --inflight 2: the same writes with two syncs in flight at once (the shape
#                     of a pipelined group commit), to show what overlapping syncs cost each
# and the CPU: the floor's own CPU per pwrite+fdatasync (user+system of the writing process)
# against the relay's CPU per sync and per message, and the relay's messages per sync.
# BATCH defaults to S x L: one group commit when every session has a message waiting.
# Prints p50 and p99 of each and the relay's ratios to the pre-written floor.
# Usage: benches/commit.sh [MESSAGES=20000] [SESSIONS=20] [SIZE=1024] [RUNS=3] [BATCH=S*L]
# Needs Debian's postfix package (smtp-source) and python3; loopback only.
set -euo pipefail
M=${1:-20000}; S=${2:-20}; L=${3:-1024}; RUNS=${4:-3}; BATCH=${5:-$((S * L))}
cd "$(dirname "$0")/.."
cargo build --release -q --workspace
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=${SLUICE_BIN:-$TARGET/release/sluice}  # SLUICE_BIN: another build to measure
LOAD=$TARGET/release/sluice-load
WORK=$(mktemp -d "${SPOOL_PARENT:-/var/tmp}/sluice-commit-bench.XXXXXX")
PIDS=()
# shellcheck source=benches/lib.sh
source "$PWD/benches/lib.sh"
trap cleanup EXIT
COUNT=$((M / S))  # as many syncs as the relay does at best

pct() { # $1 quantile (0.5, 0.99): reads numbers, prints that quantile
  sort -n | awk -v q="$1" '{a[NR]=$1} END {i=int(NR*q); if (i<1) i=1; print a[i]}'
}
raw() { # $1 prepare mode, $2 syncs in flight: prints "p50 p99 cpu_per_sync" in microseconds
  "$LOAD" disk --dir "$WORK" --size "$BATCH" --count "$COUNT" --prepare "$1" --inflight "${2:-1}" --json \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["p50_us"], d["p99_us"], d["cpu_us_per_sync"])'
}
TCK=$(getconf CLK_TCK)

pre50=(); pre99=(); fal50=(); fal99=(); rel50=(); rel99=(); two50=(); two99=()
precpu=(); relcpu=(); relsync=(); permsg=()
for run in $(seq "$RUNS"); do
  read -r a b c < <(raw prewritten); pre50+=("$a"); pre99+=("$b"); precpu+=("$c")
  read -r a b c < <(raw fallocate); fal50+=("$a"); fal99+=("$b")
  read -r a b c < <(raw prewritten 2); two50+=("$a"); two99+=("$b")
  P=$(free_port); rm -rf "$WORK/spool"
  "$BIN" serve --listen "127.0.0.1:$P" --spool "$WORK/spool" --fsync always --hostname bench.test --hold \
    --dns 127.0.0.1:1 2>"$WORK/relay.log" & RELAY=$!; PIDS+=("$RELAY"); wait_port "$P"
  c0=$(cpu_ticks "$RELAY")
  smtp-source -s "$S" -m "$M" -l "$L" -d "127.0.0.1:$P"
  c1=$(cpu_ticks "$RELAY")
  stop "$RELAY"
  syncs=$(grep -o 'event=commit_stats syncs=[0-9]*' "$WORK/relay.log" | grep -o '[0-9]*$')
  relcpu+=("$(echo "($c1 - $c0) * 1000000 / $TCK / $M" | bc -l)")
  relsync+=("$(echo "($c1 - $c0) * 1000000 / $TCK / $syncs" | bc -l)")
  permsg+=("$(echo "$M / $syncs" | bc -l)")
  n=$(grep -c 'event=accepted' "$WORK/relay.log")
  [ "$n" -eq "$M" ] || { echo "relay accepted $n of $M messages" >&2; exit 1; }
  grep -o 'commit_us=[0-9]*' "$WORK/relay.log" | cut -d= -f2 > "$WORK/lat"
  rel50+=("$(pct 0.5 < "$WORK/lat")"); rel99+=("$(pct 0.99 < "$WORK/lat")")
done

m() { printf '%s\n' "$@" | median; }
P50=$(m "${pre50[@]}"); P99=$(m "${pre99[@]}"); R50=$(m "${rel50[@]}"); R99=$(m "${rel99[@]}")
printf '\ncommit latency: %s-byte pwrite+fdatasync vs smtp-source -s %s -m %s -l %s -d into sluice --fsync always, median of %s runs (%s)\n' \
  "$BATCH" "$S" "$M" "$L" "$RUNS" "$(df -T "$WORK" | awk 'NR==2 {print $2 " on " $1}')"
printf '| what | p50 us | p99 us | p50 / floor | p99 / floor |\n|---|---|---|---|---|\n'
printf '| pwrite + fdatasync, pre-written file (the floor) | %s | %s | 1.00 | 1.00 |\n' "$P50" "$P99"
printf '| pwrite + fdatasync, fallocated file | %s | %s | %.2f | %.2f |\n' "$(m "${fal50[@]}")" "$(m "${fal99[@]}")" \
  "$(echo "$(m "${fal50[@]}") / $P50" | bc -l)" "$(echo "$(m "${fal99[@]}") / $P99" | bc -l)"
printf '| sluice end of data -> commit | %s | %s | %.2f | %.2f |\n' "$R50" "$R99" "$(echo "$R50 / $P50" | bc -l)" "$(echo "$R99 / $P99" | bc -l)"
printf '| pwrite + fdatasync, pre-written file, 2 syncs in flight | %s | %s | %.2f | %.2f |\n' "$(m "${two50[@]}")" "$(m "${two99[@]}")" \
  "$(echo "$(m "${two50[@]}") / $P50" | bc -l)" "$(echo "$(m "${two99[@]}") / $P99" | bc -l)"
PC=$(m "${precpu[@]}"); MS=$(m "${permsg[@]}")
printf '\nCPU: the floor process spends %.1f us per pwrite+fdatasync; the relay %.1f us per sync, %.1f per message, at %.2f messages per sync.\n' \
  "$PC" "$(m "${relsync[@]}")" "$(m "${relcpu[@]}")" "$MS"
printf 'The device alone costs %.1f us of CPU per message at that batch size (floor CPU / messages per sync).\n' "$(echo "$PC / $MS" | bc -l)"
printf 'per run: floor p50 %s | relay p50 %s | floor p99 %s | relay p99 %s\n' "${pre50[*]}" "${rel50[*]}" "${pre99[*]}" "${rel99[*]}"
