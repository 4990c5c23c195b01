#!/usr/bin/env bash
# kill -9 soak: runs the two e2e crash tests with many cycles (default 100).
# Accepting: each cycle, four clients send mail (every fifth body over 16 KiB, written by
# pwrite) while the relay is killed with SIGKILL at a varying moment; every message that got a
# 250 must be in the spool exactly once with its exact bytes.
# Delivering: each cycle queues 40 messages and kills the relay while it delivers them (plus
# the backlog of earlier cycles) to a slow sink; in the end every message must have arrived,
# at most one extra delivery per crash (the one in flight). Prints the counts.
#
#   benches/soak.sh [CYCLES]
set -euo pipefail
cd "$(dirname "$0")/.."
cycles="${1:-100}"
cargo build --release --workspace --quiet
start=$(date +%s)
SLUICE_SOAK_ROUNDS="$cycles" cargo test --release --quiet --test e2e -- --exact \
  e2e::durability::kill_9_never_loses_an_acknowledged_message e2e::delivery::kill_9_during_delivery_loses_no_recipient \
  --nocapture --test-threads 1 2>&1 | grep -E '^soak:|^test result|^test .*FAILED|^failures'
echo "elapsed: $(( $(date +%s) - start )) s"
