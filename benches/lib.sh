# Helpers shared by the bench scripts (sourced, not run). The caller sets PIDS=() and WORK.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# Kills every process in PIDS and removes WORK (install with `trap cleanup EXIT`).
cleanup() { for p in "${PIDS[@]}"; do { kill -9 "$p" && wait "$p"; } 2>/dev/null || true; done; rm -rf "$WORK"; }
# kib PID FIELD: a /proc/PID/status field in KiB (VmRSS, RssAnon, ...).
kib() { awk "/^$2:/ {print \$2}" "/proc/$1/status"; }
# count FILE PATTERN: lines of FILE matching PATTERN (0 when none or no file).
count() { grep -c "$2" "$1" 2>/dev/null || true; }
# wait_log FILE PATTERN SECONDS: 0 once PATTERN is in FILE; after SECONDS, 1 with the file's tail.
wait_log() {
  for _ in $(seq $(($3 * 20))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "timed out waiting for '$2' in $1" >&2; tail -5 "$1" >&2; return 1
}
# wait_count FILE PATTERN COUNT SECONDS: 0 once COUNT lines match; after SECONDS, 1 saying so.
wait_count() {
  for _ in $(seq $(($4 * 100))); do [ "$(count "$1" "$2")" -ge "$3" ] && return 0; sleep 0.01; done
  echo "timed out: $(count "$1" "$2") of $3 '$2' in $1" >&2; tail -3 "$1" >&2; return 1
}
# json_num FILE EXPR: EXPR evaluated in Python with d the JSON object in FILE.
json_num() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }
