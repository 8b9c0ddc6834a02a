#!/usr/bin/env bash
# Stop the Ray cluster that servers/ray/start-cpu.sh started, and only that one.
#
#   bash servers/ray/stop-cpu.sh [PID]    # default: the pid in $GRA_RAY_TEMP_DIR/cluster.pid
#
# Ray's actors (the Serve controller, the proxy, every replica and its vLLM engine) put
# themselves in process groups of their own, so `kill -- -PID` on `ray start` misses them,
# and `ray stop` would end every Ray process on the machine, whoever started it. This
# stops the process tree under `ray start --block` by id: TERM, then KILL after a grace.
set -uo pipefail

TEMP_DIR="${GRA_RAY_TEMP_DIR:-/tmp/gra-ray}"
PID="${1:-$(cat "$TEMP_DIR/cluster.pid" 2>/dev/null || true)}"
[[ "$PID" =~ ^[0-9]+$ ]] || { echo "stop-cpu.sh: no cluster pid given and none in $TEMP_DIR/cluster.pid" >&2; exit 2; }

# The tree as it is now: every process whose chain of parents reaches PID.
tree() {
  ps -e -o pid=,ppid= | awk -v root="$1" '
    { parent[$1] = $2 }
    END {
      for (p in parent) {
        q = p
        for (depth = 0; depth < 64 && q != "" && q != 0; depth++) {
          if (q == root) { print p; break }
          q = parent[q]
        }
      }
    }'
}

pids=$(tree "$PID")
[[ -n "$pids" ]] || exit 0
# shellcheck disable=SC2086
kill -TERM $pids 2>/dev/null
for _ in $(seq 1 30); do
  alive=""
  for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
  [[ -z "$alive" ]] && break
  sleep 0.5
done
# shellcheck disable=SC2086
[[ -n "${alive:-}" ]] && kill -KILL $alive 2>/dev/null
rm -f "$TEMP_DIR/cluster.pid"
exit 0
