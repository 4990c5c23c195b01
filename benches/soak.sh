#!/usr/bin/env bash
# kill -9 soak: runs the e2e crash test with many cycles (default 100). Each cycle, four
# clients send mail (every fifth body over 16 KiB, written by pwrite) while the relay is
# killed with SIGKILL at a varying moment; after every restart each message that got a 250 must
# be in the spool exactly once with its exact bytes, and nothing else. Prints the counts.
#
#   benches/soak.sh [CYCLES]
set -euo pipefail
cd "$(dirname "$0")/.."
cycles="${1:-100}"
cargo build --release --workspace --quiet
start=$(date +%s)
SLUICE_SOAK_ROUNDS="$cycles" cargo test --release --quiet --test e2e kill_9_never_loses_an_acknowledged_message \
  -- --exact e2e::durability::kill_9_never_loses_an_acknowledged_message --nocapture 2>&1 | grep -E '^soak:|^test result|^test .*FAILED|^failures'
echo "elapsed: $(( $(date +%s) - start )) s"
