#!/usr/bin/env bash
# DKIM signing benchmark (issue 16), one run, loopback only; rounds alternate A B A B and the
# tables show medians and ratios of the same run:
# sign: one thread's signatures per second, OpenSSL's (`openssl speed -seconds S rsa2048
#       ed25519`, one process) next to sluice's signer (criterion, benches/dkim_sign.rs: bare
#       signature of a short input; and a whole 4 KiB message: canonicalization + body hash +
#       sign); ratio sluice / OpenSSL (goal >= 0.9).
# e2e:  sluice-load send -> sluice --relay-host -> sluice-load sink, 4 KiB messages from
#       news@bench.test, end to end (until the sink has every message): unsigned, RSA-2048 with
#       --dkim-threads 1, Ed25519 with --dkim-threads 1; ratios RSA / min(unsigned, one thread's
#       RSA rate for a 4 KiB message) (goal >= 0.8) and Ed25519 / unsigned (goal >= 0.7). Every
#       delivery must carry dkim=bench.test:SELECTOR in the relay's log (signed, not skipped).
# noop: while sluice-load send keeps the relay busy (RSA: the one signing worker saturated),
#       `sluice-load noop` times NOOP round trips on another inbound session every 10 ms;
#       p99 with RSA signing / p99 unsigned under the same sender (goal <= 2). The signing
#       thread's CPU share over the probe shows that it was saturated.
# dir:  --dkim-dir with DOMAINS domains, one key each: start-up until the relay listens (keys
#       are parsed before the listeners open) and memory per key ((RSS with keys - RSS without)
#       / DOMAINS), RSA-2048 and Ed25519. Making 10,000 RSA keys takes long, so a handful are
#       made and each domain's SELECTOR.pem is a hard link to one of them: the relay still reads
#       and parses every file, which is the cost measured.
# Usage: benches/dkim.sh [MESSAGES=5000] [ROUNDS=3] [SECONDS=3] [DOMAINS=10000]
#        PARTS="sign e2e noop dir" picks the parts; NOOP_SECONDS (default 8) the probe's length.
# Needs openssl (sign) and python3. The defaults take about 5 minutes on 2 cores.
set -euo pipefail
M=${1:-5000}; ROUNDS=${2:-3}; S=${3:-3}; NDOM=${4:-10000}
PARTS=${PARTS:-sign e2e noop dir}; NOOP_S=${NOOP_SECONDS:-8}
part() { [[ " $PARTS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
cargo build --release -q --workspace
if part sign || part e2e; then cargo bench -q --bench dkim_sign --no-run; fi
if part sign; then command -v openssl >/dev/null || { echo "part sign needs openssl" >&2; exit 1; }; fi
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN=${SLUICE_BIN:-$TARGET/release/sluice}  # SLUICE_BIN: another build to measure
LOAD=$TARGET/release/sluice-load
WORK=$(mktemp -d /tmp/sluice-dkim-bench.XXXXXX)
PIDS=()
# shellcheck source=benches/lib.sh
source "$PWD/benches/lib.sh"
trap cleanup EXIT
TCK=$(getconf CLK_TCK)
SIZE=4096
FROM=news@bench.test

med() { printf '%s\n' "$@" | median; }
ratio() { echo "$1 / $2" | bc -l; }
# CPU ticks of the relay's signing threads (sluice-dkim-N).
dkim_ticks() {
  local t=0 d
  for d in /proc/"$1"/task/*; do
    [[ "$(cat "$d/comm" 2>/dev/null)" == sluice-dkim-* ]] && t=$((t + $(awk '{print $14+$15}' "$d/stat")))
  done
  echo "$t"
}

DNS_PORT=$(free_port)
"$LOAD" dns --listen "127.0.0.1:$DNS_PORT" --zone dest.test=127.0.0.1 2>"$WORK/dns.log" & PIDS+=("$!")
wait_port "$DNS_PORT"
"$BIN" dkim-keygen bench.test rsa1 --out "$WORK/rsa.pem" >/dev/null
"$BIN" dkim-keygen bench.test ed1 --ed25519 --out "$WORK/ed.pem" >/dev/null
# mode -> relay flags (U unsigned, R RSA-2048, E Ed25519) and the dkim= value its deliveries log.
flags() {
  case $1 in
    U) ;;
    R) echo "--dkim-key bench.test:rsa1:$WORK/rsa.pem --dkim-threads 1" ;;
    E) echo "--dkim-key bench.test:ed1:$WORK/ed.pem --dkim-threads 1" ;;
  esac
}
signed_as() { case $1 in U) echo none ;; R) echo bench.test:rsa1 ;; E) echo bench.test:ed1 ;; esac; }
# sink_relay MODE [SINK FLAGS...]: a sink and a relay to it (fresh spool); sets SINK, RELAY, RELAY_PORT.
sink_relay() {
  local mode=$1; shift
  local p; p=$(free_port); RELAY_PORT=$(free_port)
  "$LOAD" sink --listen "127.0.0.1:$p" --interval 0 "$@" 2>"$WORK/sink.log" & SINK=$!; PIDS+=("$SINK")
  wait_port "$p"
  rm -rf "$WORK/spool"
  # shellcheck disable=SC2046  # the flags are split into words on purpose
  "$BIN" serve --listen "127.0.0.1:$RELAY_PORT" --spool "$WORK/spool" --fsync always --hostname bench.test \
    --relay-host "127.0.0.1:$p" --dns "127.0.0.1:$DNS_PORT" $(flags "$mode") 2>"$WORK/relay.log" &
  RELAY=$!; PIDS+=("$RELAY"); wait_port "$RELAY_PORT"
}
# crit FILTER: runs the criterion benches matching FILTER; crit_rate NAME: its median, per second.
crit() { cargo bench -q --bench dkim_sign -- --warm-up-time 1 --measurement-time "$S" "$1" >"$WORK/criterion.log" 2>&1; }
crit_rate() { json_num "$TARGET/criterion/dkim/$1/new/estimates.json" '1e9 / d["median"]["point_estimate"]'; }
# openssl speed's sign/s for RSA-2048 and Ed25519, read by the column named sign/s (its place
# differs between OpenSSL versions).
ossl() {
  openssl speed -seconds "$S" rsa2048 ed25519 2>/dev/null | awk '
    /sign\/s/ { for (i = 1; i <= NF; i++) if ($i == "sign/s") k = NF - i; next }
    /^rsa 2048 bits/ { rsa = $(NF - k) }
    /\(Ed25519\)/ { ed = $(NF - k) }
    END { if (rsa == "" || ed == "") exit 1; print rsa, ed }'
}

# sign: one thread, OpenSSL and sluice's signer alternating.
SIGN_RSA_MSG=
if part sign; then
  o_rsa=(); o_ed=(); c_rsa=(); c_ed=(); c_rsa_msg=(); c_ed_msg=()
  for _ in $(seq "$ROUNDS"); do
    out=$(ossl) || { echo "openssl speed printed no rsa2048 and ed25519 sign/s" >&2; exit 1; }
    read -r a b <<<"$out"; o_rsa+=("$a"); o_ed+=("$b")
    crit 'dkim/'
    c_rsa+=("$(crit_rate rsa2048_sign)"); c_ed+=("$(crit_rate ed25519_sign)")
    c_rsa_msg+=("$(crit_rate rsa2048_message_4k)"); c_ed_msg+=("$(crit_rate ed25519_message_4k)")
  done
  o_rsa_m=$(med "${o_rsa[@]}"); o_ed_m=$(med "${o_ed[@]}")
  c_rsa_m=$(med "${c_rsa[@]}"); c_ed_m=$(med "${c_ed[@]}")
  SIGN_RSA_MSG=$(med "${c_rsa_msg[@]}"); c_ed_msg_m=$(med "${c_ed_msg[@]}")
  printf '\nsign: one thread, %s alternating rounds of openssl speed -seconds %s and criterion (--measurement-time %s)\n' "$ROUNDS" "$S" "$S"
  printf '| what | sluice sign/s | openssl sign/s | ratio | goal |\n|---|---|---|---|---|\n'
  printf '| RSA-2048 signature | %.0f | %.0f | %.2f | >= 0.9 |\n' "$c_rsa_m" "$o_rsa_m" "$(ratio "$c_rsa_m" "$o_rsa_m")"
  printf '| Ed25519 signature | %.0f | %.0f | %.2f | >= 0.9 |\n' "$c_ed_m" "$o_ed_m" "$(ratio "$c_ed_m" "$o_ed_m")"
  printf '| 4 KiB message, RSA-2048 (canonicalize + body hash + sign) | %.0f | - | - | - |\n' "$SIGN_RSA_MSG"
  printf '| 4 KiB message, Ed25519 | %.0f | - | - | - |\n' "$c_ed_msg_m"
  printf 'per round: openssl rsa %s ed %s | sluice rsa %s ed %s\n' "$(printf '%.0f ' "${o_rsa[@]}")" \
    "$(printf '%.0f ' "${o_ed[@]}")" "$(printf '%.0f ' "${c_rsa[@]}")" "$(printf '%.0f ' "${c_ed[@]}")"
fi

# e2e: unsigned, RSA-2048 and Ed25519 alternating.
if part e2e; then
  if [ -z "$SIGN_RSA_MSG" ]; then crit 'dkim/rsa2048_message_4k'; SIGN_RSA_MSG=$(crit_rate rsa2048_message_4k); fi
  declare -A rates=([U]="" [R]="" [E]="")
  for _ in $(seq "$ROUNDS"); do
    for mode in U R E; do
      sink_relay "$mode" --expect-recipients "$M"
      t0=$(now)
      "$LOAD" send --to "127.0.0.1:$RELAY_PORT" --messages "$M" --connections 20 --size "$SIZE" --from "$FROM" \
        --domains dest.test --quiet --json >"$WORK/send.json"
      wait_count "$WORK/sink.log" 'event=expected' 1 600
      t1=$(now)
      # The delivery lines follow the sink's last 250 by a moment.
      wait_count "$WORK/relay.log" 'outcome=delivered' "$M" 30
      stop "$RELAY"; stop "$SINK"
      signed=$(grep 'outcome=delivered' "$WORK/relay.log" | grep -c "dkim=$(signed_as "$mode")" || true)
      [ "$signed" -eq "$M" ] || { echo "mode $mode: $signed of $M deliveries logged dkim=$(signed_as "$mode")" >&2; exit 1; }
      rates[$mode]+="$(echo "$M / ($t1 - $t0)" | bc -l) "
    done
  done
  # shellcheck disable=SC2086  # the per-round rates are split into words on purpose
  { um=$(med ${rates[U]}); rm_=$(med ${rates[R]}); em=$(med ${rates[E]}); }
  bound=$(echo "if ($um < $SIGN_RSA_MSG) $um else $SIGN_RSA_MSG" | bc -l)
  printf '\ne2e: sluice-load send (20 connections, %s x %s B from %s) -> sluice --fsync always --relay-host -> sluice-load sink, %s alternating rounds\n' "$M" "$SIZE" "$FROM" "$ROUNDS"
  printf '| relay | msg/s end to end (median) | per round | ratio | goal |\n|---|---|---|---|---|\n'
  printf '| unsigned | %.0f | %s| 1.00 | - |\n' "$um" "$(printf '%.0f ' ${rates[U]})"
  printf '| RSA-2048, --dkim-threads 1 | %.0f | %s| %.2f of min(unsigned, %.0f signed 4 KiB messages/s on one thread) | >= 0.8 |\n' \
    "$rm_" "$(printf '%.0f ' ${rates[R]})" "$(ratio "$rm_" "$bound")" "$SIGN_RSA_MSG"
  printf '| Ed25519, --dkim-threads 1 | %.0f | %s| %.2f of unsigned | >= 0.7 |\n' "$em" "$(printf '%.0f ' ${rates[E]})" "$(ratio "$em" "$um")"
fi

# noop: NOOP round trips on a separate session under load, unsigned and RSA alternating.
if part noop; then
  declare -A p99=([U]="" [R]="") p50=([U]="" [R]="") mx=([U]="" [R]="") busy=([U]="" [R]="") sent=([U]="" [R]="")
  for _ in $(seq "$ROUNDS"); do
    for mode in U R; do
      sink_relay "$mode"
      "$LOAD" send --to "127.0.0.1:$RELAY_PORT" --duration "$((NOOP_S + 2))s" --connections 20 --size "$SIZE" \
        --from "$FROM" --domains dest.test --quiet --json >"$WORK/send.json" & SEND=$!; PIDS+=("$SEND")
      sleep 1
      c0=$(dkim_ticks "$RELAY")
      "$LOAD" noop --to "127.0.0.1:$RELAY_PORT" --interval 10ms --duration "${NOOP_S}s" --json >"$WORK/noop.json"
      c1=$(dkim_ticks "$RELAY")
      wait "$SEND"
      stop "$RELAY"; stop "$SINK"
      p99[$mode]+="$(json_num "$WORK/noop.json" 'd["round_trip"]["p99_us"]') "
      p50[$mode]+="$(json_num "$WORK/noop.json" 'd["round_trip"]["p50_us"]') "
      mx[$mode]+="$(json_num "$WORK/noop.json" 'd["round_trip"]["max_us"]') "
      busy[$mode]+="$(echo "($c1 - $c0) * 100 / $TCK / $NOOP_S" | bc -l) "
      sent[$mode]+="$(json_num "$WORK/send.json" 'd["msgs_per_s"]') "
    done
  done
  printf '\nnoop: NOOP every 10 ms for %s s on one session while sluice-load send (20 connections, %s B) loads the relay, %s alternating rounds (medians, us)\n' "$NOOP_S" "$SIZE" "$ROUNDS"
  printf '| relay | p50 | p99 | max | p99 per round | signing thread CPU %% | sender msg/s |\n|---|---|---|---|---|---|---|\n'
  # shellcheck disable=SC2086  # the per-round figures are split into words on purpose
  for mode in U R; do
    label=$([ "$mode" = U ] && echo unsigned || echo "RSA-2048, --dkim-threads 1")
    printf '| %s | %.0f | %.0f | %.0f | %s| %.0f | %.0f |\n' "$label" "$(med ${p50[$mode]})" "$(med ${p99[$mode]})" \
      "$(med ${mx[$mode]})" "${p99[$mode]}" "$(med ${busy[$mode]})" "$(med ${sent[$mode]})"
  done
  # shellcheck disable=SC2086
  printf 'p99 ratio RSA / unsigned: %.2f (goal <= 2)\n' "$(ratio "$(med ${p99[R]})" "$(med ${p99[U]})")"
fi

# dir: --dkim-dir with NDOM domains.
if part dir; then
  for k in 1 2 3 4; do
    "$BIN" dkim-keygen bench.test s1 --out "$WORK/rsa-$k.pem" >/dev/null
    "$BIN" dkim-keygen bench.test s1 --ed25519 --out "$WORK/ed-$k.pem" >/dev/null
  done
  # DIR/dN.bench.test/s1.pem, each a hard link to one of the four keys of its type.
  python3 - "$WORK" "$NDOM" <<'EOF'
import os, sys
work, n = sys.argv[1], int(sys.argv[2])
for kind in ("rsa", "ed"):
    for i in range(n):
        d = os.path.join(work, "dir-" + kind, "d%d.bench.test" % i)
        os.makedirs(d)
        os.link(os.path.join(work, "%s-%d.pem" % (kind, i % 4 + 1)), os.path.join(d, "s1.pem"))
EOF
  declare -A up=([none]="" [rsa]="" [ed]="") rss=([none]="" [rsa]="" [ed]="") anon=([none]="" [rsa]="" [ed]="")
  for _ in $(seq "$ROUNDS"); do
    for mode in none rsa ed; do
      rm -rf "$WORK/spool"; P=$(free_port)
      extra=(); [ "$mode" = none ] || extra=(--dkim-dir "$WORK/dir-$mode")
      t0=$(now)
      "$BIN" serve --listen "127.0.0.1:$P" --spool "$WORK/spool" --fsync always --hostname bench.test \
        --relay-host "127.0.0.1:9" --dns "127.0.0.1:$DNS_PORT" "${extra[@]}" 2>"$WORK/dir.log" &
      RELAY=$!; PIDS+=("$RELAY")
      wait_count "$WORK/dir.log" 'event=listening' 1 600
      t1=$(now)
      [ "$mode" = none ] || grep -q "event=dkim keys=$NDOM domains=$NDOM" "$WORK/dir.log" \
        || { echo "$mode: the relay did not load $NDOM keys" >&2; grep event=dkim "$WORK/dir.log" >&2; exit 1; }
      up[$mode]+="$(echo "$t1 - $t0" | bc -l) "
      rss[$mode]+="$(kib "$RELAY" VmRSS) "; anon[$mode]+="$(kib "$RELAY" RssAnon) "
      stop "$RELAY"
    done
  done
  # shellcheck disable=SC2086  # the per-round figures are split into words on purpose
  { r0=$(med ${rss[none]}); a0=$(med ${anon[none]}); }
  printf '\ndir: --dkim-dir with %s domains, one key each (hard links to 4 keys per type), %s alternating rounds (medians)\n' "$NDOM" "$ROUNDS"
  printf '| keys | start-up until listening s | per round | VmRSS KiB | RssAnon KiB | bytes per key (VmRSS) | bytes per key (RssAnon) |\n|---|---|---|---|---|---|---|\n'
  # shellcheck disable=SC2086
  for mode in none rsa ed; do
    label=$(case $mode in none) echo none ;; rsa) echo "$NDOM RSA-2048" ;; ed) echo "$NDOM Ed25519" ;; esac)
    r=$(med ${rss[$mode]}); a=$(med ${anon[$mode]})
    if [ "$mode" = none ]; then per_r=-; per_a=-; else
      per_r=$(printf '%.0f' "$(echo "($r - $r0) * 1024 / $NDOM" | bc -l)"); per_a=$(printf '%.0f' "$(echo "($a - $a0) * 1024 / $NDOM" | bc -l)"); fi
    printf '| %s | %.2f | %s| %s | %s | %s | %s |\n' "$label" "$(med ${up[$mode]})" "$(printf '%.2f ' ${up[$mode]})" "$r" "$a" "$per_r" "$per_a"
  done
fi
