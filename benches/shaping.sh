#!/usr/bin/env bash
# Traffic shaping benchmark, one run, loopback only:
# 1. Overhead: smtp-source -> sluice --relay-host -> smtp-sink end to end, rounds alternating
#    A (--no-builtin-shaping, no file) and B (built-in profiles + a file whose limits are never
#    hit); medians and the ratio B/A (goal >= 0.95).
# 2. Accuracy: a backlog to one site with max_message_rate = R (50/s, 600/min): the rate the
#    sink counts over 30 s (goal within 5 % of R) and its busiest second (never more than the
#    bucket above R).
# 3. Gmail-like receiver (421 4.7.28 above 50 messages/s from one IP), a 3,000-message backlog:
#    sluice with max_message_rate = 45/s (goal: no 421, done within 1.1 x 3000/45 s), sluice
#    with no rate and a short automation rule (gets 421s, must still deliver everything), and
#    Postfix relaying the same backlog to the same sink.
# 4. A receiver that answers 421 4.7.28 to everything for 60 s: the transactions sluice tries in
#    the window with the built-in rule (<= 3 expected) next to Postfix's, and when each has
#    delivered the backlog (waiting at most PART4_WAIT s after the window).
# Backlogs: sluice's is queued under --hold and the relay restarted (the clock starts at the
# restart); Postfix's is put on hold by its smtpd (check_client_access static:HOLD) and released
# with postsuper -H ALL + postqueue -f (the clock starts at the release). Postfix is a throw-away
# instance (`sluice-load postfix`: its own directory, relayhost [127.0.0.1]:SINK, no DNS, never
# the system service), with its retry times cut to sluice's --retry-schedule here (defaults:
# 300 s minimal backoff, 4000 s maximal, 300 s queue scans), and waited for at most POSTFIX_WAIT s.
# In parts 3 and 4 the clock stops when the sink has accepted every recipient (event=expected).
# Usage: benches/shaping.sh [OVERHEAD_MESSAGES=20000] [ROUNDS=3]   (PARTS="1 2 3 4": which to run)
# Smaller runs: GMAIL_BACKLOG=3000, WINDOW=60 (part 4's refusal window, s), PART4_WAIT=120,
# POSTFIX_WAIT=600. Needs Debian's postfix package (smtp-source, smtp-sink; Postfix itself for
# its rows, run as root) and python3.
set -euo pipefail
M=${1:-20000}; ROUNDS=${2:-3}; PARTS=${PARTS:-1 2 3 4}
G=${GMAIL_BACKLOG:-3000}; WINDOW=${WINDOW:-60}; PART4_WAIT=${PART4_WAIT:-120}; POSTFIX_WAIT=${POSTFIX_WAIT:-600}
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
# A `sluice-load postfix` is stopped by SIGTERM (it then stops its Postfix), never SIGKILL first.
PF_PIDS=()
trap 'for p in "${PF_PIDS[@]}"; do stop "$p"; done; cleanup' EXIT

DNS_PORT=$(free_port)
"$LOAD" dns --listen "127.0.0.1:$DNS_PORT" --zone dest.test=127.0.0.1 2>"$WORK/dns.log" & PIDS+=("$!")
wait_port "$DNS_PORT"
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
# wait_line FILE PATTERN SECONDS: wait_log without its complaint (a timeout is a result here).
wait_line() { wait_log "$@" 2>/dev/null; }
# sink PORT LOG FLAGS...: a --json sink that logs event=expected once it has BACKLOG_N recipients.
sink() {
  local port=$1 log=$2; shift 2
  "$LOAD" sink --listen "127.0.0.1:$port" --json --interval 0 --expect-recipients "$BACKLOG_N" "$@" \
    >"$WORK/sink.json" 2>"$log" & SINK=$!; PIDS+=("$SINK"); wait_port "$port"
}
# postfix_backlog N SINK_PORT RETRY: a throw-away Postfix relaying to 127.0.0.1:SINK_PORT with
# every backoff and queue scan at RETRY, holding N messages; sets PF and PF_DIR. Fails (with
# Postfix's reason in $WORK/pf.log) when Postfix cannot run here.
postfix_backlog() {
  local n=$1 sink=$2 retry=$3
  "$LOAD" postfix --relay-host "127.0.0.1:$sink" --duration 2h \
    --set 'smtpd_client_restrictions=check_client_access static:HOLD' \
    --set "minimal_backoff_time=$retry" --set "maximal_backoff_time=$retry" --set "queue_run_delay=$retry" \
    >"$WORK/pf.json" 2>"$WORK/pf.log" & PF=$!; PF_PIDS+=("$PF")
  wait_line "$WORK/pf.log" 'event=listening' 60 || return 1
  local addr; addr=$(grep -o 'event=listening .*' "$WORK/pf.log" | grep -o 'addr=[^ ]*' | cut -d= -f2)
  PF_DIR=$(grep -o 'event=listening .*' "$WORK/pf.log" | grep -o 'dir=[^ ]*' | cut -d= -f2)
  "$LOAD" send --to "$addr" --messages "$n" --connections 8 --domains dest.test --quiet >/dev/null
  local held; held=$(find "$PF_DIR/queue/hold" -type f | wc -l)
  [ "$held" -eq "$n" ] || { echo "Postfix holds $held of $n messages" >>"$WORK/pf.log"; return 1; }
}
postfix_release() { postsuper -c "$PF_DIR/conf" -H ALL 2>/dev/null; postqueue -c "$PF_DIR/conf" -f; }
postfix_stop() { stop "$PF"; PF_PIDS=(); }
# Why Postfix did not run, on one line.
postfix_why() { grep -v '^event=' "$WORK/pf.log" | tr '\n' ' ' | cut -c1-200; }
# start_backlog MODE N SINK_PORT RETRY: N messages queued for sluice (`backlog`) or a held
# Postfix (MODE postfix, every backoff RETRY); 1, with a "not run" row printed, when Postfix
# cannot run here.
start_backlog() {
  if [ "$1" != postfix ]; then backlog "$2"; return 0; fi
  postfix_backlog "$2" "$3" "$4" && return 0
  printf '| Postfix | - | - | not run: %s |\n' "$(postfix_why)"; postfix_stop; return 1
}
# finish_backlog MODE T0 CAP: waits up to CAP s for the sink to have the backlog, then stops the
# relay (or Postfix) and the sink; sets SECS to the seconds since T0, or empty if not finished.
finish_backlog() {
  SECS=
  if wait_line "$WORK/sink.log" 'event=expected' "$3"; then SECS=$(printf '%.1f' "$(echo "$(now) - $2" | bc -l)"); fi
  if [ "$1" = postfix ]; then postfix_stop; else stop "$RELAY"; fi
  stop "$SINK"
}

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
printf '\n3. Gmail-like receiver (421 4.7.28 above 50/s per IP), %s-message backlog\n' "$G"
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
BACKLOG_N=$G
for mode in rate45 automation postfix; do
  P=$(free_port)
  start_backlog "$mode" "$G" "$P" 5s || continue
  sink "$P" "$WORK/sink.log" --rate-limit 50/s
  t0=$(now)
  case $mode in
    rate45) relay "$WORK/g.log" "$P" --shaping "$WORK/g45.toml" --retry-schedule 5s; cap=600 ;;
    automation) relay "$WORK/g.log" "$P" --shaping "$WORK/gauto.toml" --retry-schedule 5s; cap=600 ;;
    postfix) postfix_release; cap=$POSTFIX_WAIT ;;
  esac
  finish_backlog "$mode" "$t0" "$cap"
  secs=${SECS:-not finished after $cap s}
  r421=$(json_num "$WORK/sink.json" 'd["refusals"]["rate_limit"]')
  got=$(json_num "$WORK/sink.json" 'd["messages"]')
  case $mode in
    rate45) printf '| sluice, max_message_rate = 45/s | %s | %s | 0 and <= %.1f |\n' "$r421" "$secs" "$(echo "1.1 * $G / 45" | bc -l)" ;;
    automation) printf '| sluice, no rate, 10 s automation throttle to 40/s | %s | %s | all delivered (%s of %s) |\n' "$r421" "$secs" "$got" "$G" ;;
    postfix) printf '| Postfix (backoff and queue scans 5 s) | %s | %s | comparison (%s of %s delivered) |\n' "$r421" "$secs" "$got" "$G" ;;
  esac
done
fi

# 4. Everything refused with 421 4.7.28 for WINDOW s (built-in rule: 1 message a minute).
if part 4; then
printf '\n4. receiver answering 421 4.7.28 to everything for %s s, 100-message backlog\n' "$WINDOW"
printf '| relay | transactions refused in the window | throttle logged | all 100 delivered |\n|---|---|---|---|\n'
BACKLOG_N=100
for mode in sluice postfix; do
  P=$(free_port)
  start_backlog "$mode" 100 "$P" 10s || continue
  sink "$P" "$WORK/sink.log" --defer-all-for "${WINDOW}s"
  t0=$(now)
  if [ "$mode" = postfix ]; then postfix_release; else relay "$WORK/w.log" "$P" --retry-schedule 10s; fi
  cap=$((WINDOW + PART4_WAIT))
  finish_backlog "$mode" "$t0" "$cap"
  done_at=${SECS:+after $SECS s}; done_at=${done_at:-not finished after $cap s}
  win=$(json_num "$WORK/sink.json" 'd["refusals"]["window"]')
  got=$(json_num "$WORK/sink.json" 'd["messages"]')
  if [ "$mode" = postfix ]; then
    printf '| Postfix (backoff and queue scans 10 s) | %s | - | %s (%s of 100) |\n' "$win" "$done_at" "$got"
  else
    printf '| sluice (built-in rule, --retry-schedule 10s) | %s | %s | %s (%s of 100) |\n' "$win" "$(count "$WORK/w.log" 'event=throttle')" "$done_at" "$got"
  fi
done
fi
