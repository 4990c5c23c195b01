#!/usr/bin/env bash
# Traffic shaping benchmark, one run, loopback only:
# 1. Overhead: smtp-source -> sluice --relay-host -> smtp-sink end to end, rounds alternating
#    A (--no-builtin-shaping, no file) and B (built-in profiles + a file whose limits are never
#    hit); medians and the ratio B/A (goal >= 0.95).
# 2. Accuracy: a backlog to one site with max_message_rate = R (50/s, 600/min): the rate the
#    sink counts over 30 s (goal within 5 % of R) and its busiest second (never more than the
#    bucket above R).
# 3. Gmail-like receiver (421 4.7.28 above 50 messages/s from one IP), a 3,000-message backlog:
#    sluice with max_message_rate = 45/s (goal: no 421, done within 1.1 x 3000/45 s) and sluice
#    with no rate and a short automation rule (gets 421s, must still deliver everything).
# 4. A receiver that answers 421 4.7.28 to everything for 60 s: the attempts sluice makes in the
#    window with the built-in rule (<= 3 expected), and when the backlog is delivered.
# Usage: benches/shaping.sh [OVERHEAD_MESSAGES=20000] [ROUNDS=3]   (PARTS="1 2 3 4": which to run)
# Needs Debian's postfix package (smtp-source, smtp-sink) and python3.
set -euo pipefail
M=${1:-20000}; ROUNDS=${2:-3}; PARTS=${PARTS:-1 2 3 4}
part() { [[ " $PARTS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
cargo build --release -q --workspace
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=${SLUICE_BIN:-$TARGET/release/sluice}
LOAD=$TARGET/release/sluice-load
WORK=$(mktemp -d /tmp/sluice-shaping-bench.XXXXXX)
PIDS=()
# shellcheck source=benches/lib.sh
source "$PWD/benches/lib.sh"
trap cleanup EXIT

DNS_PORT=$(free_port)
"$LOAD" dns --listen "127.0.0.1:$DNS_PORT" --zone dest.test=127.0.0.1 2>"$WORK/dns.log" & PIDS+=("$!")
wait_port "$DNS_PORT"
count() { grep -c "$2" "$1" 2>/dev/null || true; }
wait_count() { # $1 file, $2 pattern, $3 count, $4 seconds
  for _ in $(seq $(($4 * 50))); do [ "$(count "$1" "$2")" -ge "$3" ] && return 0; sleep 0.02; done
  echo "timed out: $(count "$1" "$2") of $3 '$2' in $1" >&2; tail -3 "$1" >&2; return 1
}
# relay LOG SINK_PORT FLAGS...: a relay to 127.0.0.1:SINK_PORT; sets RELAY and RELAY_PORT.
relay() {
  local log=$1 sink=$2; shift 2
  RELAY_PORT=$(free_port)
  "$BIN" serve --listen "127.0.0.1:$RELAY_PORT" --spool "$WORK/spool" --fsync always --hostname bench.test \
    --relay-host "127.0.0.1:$sink" --dns "127.0.0.1:$DNS_PORT" "$@" 2>"$log" &
  RELAY=$!; PIDS+=("$RELAY"); wait_port "$RELAY_PORT"
}
# backlog N: N messages queued under --hold (the relay then stopped), in $WORK/spool.
backlog() {
  rm -rf "$WORK/spool"
  relay "$WORK/hold.log" 9 --hold
  "$LOAD" send --to "127.0.0.1:$RELAY_PORT" --messages "$1" --connections 8 --domains dest.test >/dev/null
  stop "$RELAY"
}
json_num() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }

# 1. Overhead.
if part 1; then
cat >"$WORK/loose.toml" <<'EOF'
[default]
connection_limit = 1000
max_deliveries_per_connection = 100000
max_message_rate = "1000000/s"
max_connection_rate = "100000/s"
[domain."dest.test"]
max_message_rate = "1000000/s"
EOF
a=(); b=()
for _ in $(seq "$ROUNDS"); do
  for mode in A B; do
    P=$(free_port)
    smtp-sink -u nobody "127.0.0.1:$P" 1000 & SINK=$!; PIDS+=("$SINK"); wait_port "$P"
    rm -rf "$WORK/spool"
    if [ "$mode" = A ]; then relay "$WORK/o.log" "$P" --no-builtin-shaping
    else relay "$WORK/o.log" "$P" --shaping "$WORK/loose.toml"; fi
    t0=$(now)
    smtp-source -s 20 -m "$M" -l 1024 -d -f s@bench.test -t r@dest.test "127.0.0.1:$RELAY_PORT"
    wait_count "$WORK/o.log" 'outcome=delivered' "$M" 120
    t1=$(now); stop "$RELAY"; stop "$SINK"
    r=$(echo "$M / ($t1 - $t0)" | bc -l)
    if [ "$mode" = A ]; then a+=("$r"); else b+=("$r"); fi
  done
done
am=$(printf '%s\n' "${a[@]}" | median); bm=$(printf '%s\n' "${b[@]}" | median)
printf '\n1. overhead, end to end, %s messages, %s alternating rounds\n' "$M" "$ROUNDS"
printf '| relay | msg/s (median) | per round |\n|---|---|---|\n'
printf '| --no-builtin-shaping | %.0f | %s |\n' "$am" "$(printf '%.0f ' "${a[@]}")"
printf '| built-in + loose file | %.0f | %s |\n' "$bm" "$(printf '%.0f ' "${b[@]}")"
printf 'ratio: %.3f (goal >= 0.95)\n' "$(echo "$bm / $am" | bc -l)"
fi

# 2. Accuracy over 30 s.
if part 2; then
printf '\n2. accuracy: backlog to one site, rate counted by the sink over seconds 1-30\n'
printf '| max_message_rate | expected/s | measured/s | error | busiest second | bucket |\n|---|---|---|---|---|---|\n'
for spec in "50/s:50:50" "600/min:10:10"; do
  IFS=: read -r rate per_s cap <<<"$spec"
  backlog $((per_s * 40 + cap))
  printf '[default]\nmax_message_rate = "%s"\n' "$rate" >"$WORK/rate.toml"
  P=$(free_port)
  "$LOAD" sink --listen "127.0.0.1:$P" --json >"$WORK/sink.json" 2>/dev/null & SINK=$!; PIDS+=("$SINK"); wait_port "$P"
  relay "$WORK/a.log" "$P" --shaping "$WORK/rate.toml"
  sleep 31.5
  stop "$SINK"; stop "$RELAY"
  got=$(json_num "$WORK/sink.json" 'sum(d["accepted_per_second"][1:31])/30')
  busiest=$(json_num "$WORK/sink.json" 'max(d["accepted_per_second"][1:31])')
  printf '| %s | %s | %.2f | %+.1f %% | %s | %s |\n' "$rate" "$per_s" "$got" "$(echo "($got - $per_s) * 100 / $per_s" | bc -l)" "$busiest" "$cap"
done
fi

# 3. Gmail-like receiver.
if part 3; then
printf '\n3. Gmail-like receiver (421 4.7.28 above 50/s per IP), 3000-message backlog\n'
printf '| relay | 421s | time s | goal |\n|---|---|---|---|\n'
cat >"$WORK/g45.toml" <<'EOF'
[default]
max_message_rate = "45/s"
EOF
cat >"$WORK/gauto.toml" <<'EOF'
[[automation]]
match = '4\.7\.28'
action = "throttle"
duration = "10s"
max_message_rate = "40/s"
EOF
for mode in rate45 automation; do
  backlog 3000
  P=$(free_port)
  "$LOAD" sink --listen "127.0.0.1:$P" --json --rate-limit 50/s >"$WORK/sink.json" 2>/dev/null & SINK=$!; PIDS+=("$SINK"); wait_port "$P"
  t0=$(now)
  if [ "$mode" = rate45 ]; then relay "$WORK/g.log" "$P" --shaping "$WORK/g45.toml" --retry-schedule 5s
  else relay "$WORK/g.log" "$P" --shaping "$WORK/gauto.toml" --retry-schedule 5s; fi
  wait_count "$WORK/g.log" 'outcome=delivered' 3000 600
  t1=$(now); stop "$RELAY"; stop "$SINK"
  r421=$(json_num "$WORK/sink.json" 'd["refusals"]["rate_limit"]')
  secs=$(echo "$t1 - $t0" | bc -l)
  if [ "$mode" = rate45 ]; then goal="0 and <= $(echo "1.1 * 3000 / 45" | bc -l | xargs printf '%.1f')"; else goal="all delivered"; fi
  printf '| sluice %s | %s | %.1f | %s |\n' "$mode" "$r421" "$secs" "$goal"
done
fi

# 4. Everything refused with 421 4.7.28 for 60 s (built-in rule: 1 message a minute).
if part 4; then
printf '\n4. receiver answering 421 4.7.28 to everything for 60 s, 100-message backlog\n'
backlog 100
P=$(free_port)
"$LOAD" sink --listen "127.0.0.1:$P" --json --defer-all-for 60s >"$WORK/sink.json" 2>/dev/null & SINK=$!; PIDS+=("$SINK"); wait_port "$P"
relay "$WORK/w.log" "$P" --retry-schedule 10s
sleep 61
win=$(count "$WORK/w.log" 'outcome=deferred')
stop "$RELAY"; stop "$SINK"
r421=$(json_num "$WORK/sink.json" 'd["refusals"]["window"]')
printf '| relay | transactions refused in the 60 s window | throttle logged |\n|---|---|---|\n'
printf '| sluice (built-in rule) | %s | %s |\n' "$r421" "$(count "$WORK/w.log" 'event=throttle')"
fi
