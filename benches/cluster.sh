#!/usr/bin/env bash
# The cluster figures of docs/benchmarks.md: one node against three on the same Cassandra, cross-node DM
# latency against same-node, a 5,000-member group's deliveries/s and inter-node messages per message, and
# the time to re-home after kill -9. Loopback only; every run is bounded.
#
#   benches/cluster.sh [dm|group|rehome|all]      (default: all)
#
# Needs: a release build (cargo build --release -p switchboard -p switchboard-load), redis-server, one
# Cassandra node (scripts/cassandra start), and for rehome Python's websockets (pip install websockets).
# Environment: RATE_DM (default 100), RATE_GROUP (default 300), DURATION (default 20), RUNS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/switchboard
LOAD=target/release/switchboard-load
RATE_DM=${RATE_DM:-100}
RATE_GROUP=${RATE_GROUP:-300}
DURATION=${DURATION:-20}
RUNS=${RUNS:-2}
REDIS_PORT=16390
WORK=$(mktemp -d /tmp/sb-cluster-bench.XXXXXX)
trap 'stop_nodes; redis-cli -p $REDIS_PORT shutdown nosave >/dev/null 2>&1 || true; [ -n "${KEEP_LOGS:-}" ] || rm -rf "$WORK"' EXIT

redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null

stop_nodes() { pkill -f "serve --node-name bench" 2>/dev/null || true; while pgrep -f "serve --node-name bench" >/dev/null; do sleep 0.2; done; }

# start_nodes N: N nodes on 127.0.0.1..N:18080 on a fresh keyspace (N = 1: a node outside any cluster).
start_nodes() {
  local n=$1 ks="bench_$(date +%s%N | tail -c 9)" seeds="" i
  for i in $(seq 1 "$n"); do seeds+="127.0.0.$i:14370,"; done
  PIDS=""; SERVERS=""
  for i in $(seq 1 "$n"); do
    local cluster=()
    if [ "$n" -gt 1 ]; then
      cluster=(--cluster-listen "127.0.0.$i:14370" --seeds "${seeds%,}" --cookie bench
               --redis "redis://127.0.0.1:$REDIS_PORT")
    fi
    "$BIN" serve --node-name "bench$i" --listen "127.0.0.$i:18080" --data-dir "$WORK/n$i" \
      --store "cassandra://127.0.0.1:9042/$ks?timeout_ms=30000" --jwt-secret bench --dev-login true \
      --log "${NODE_LOG:-warn}" "${cluster[@]}" > "$WORK/n$i.log" 2>&1 &
    PIDS+="$!,"; SERVERS+="127.0.0.$i:18080,"
    [ "$i" = 1 ] && until curl -sf "127.0.0.1:18080/readyz" >/dev/null; do sleep 0.2; done  # creates the keyspace
  done
  PIDS=${PIDS%,}; SERVERS=${SERVERS%,}
  for i in $(seq 1 "$n"); do until curl -sf "127.0.0.$i:18080/readyz" >/dev/null; do sleep 0.2; done; done
  if [ "$n" -gt 1 ]; then
    until [ "$(curl -s 127.0.0.1:18080/v1/cluster | grep -o '"state":"up"' | wc -l)" = "$n" ]; do sleep 0.2; done
  fi
}

load() { "$LOAD" "$@" --servers "$SERVERS" --server-pid "$PIDS" --jwt-secret bench; }

dm() {
  for run in $(seq 1 "$RUNS"); do
    for placement in same cross; do
      echo "== dm, 3 nodes, placement $placement, $RATE_DM msg/s, run $run"
      start_nodes 3; load dm --pairs 50 --rate "$RATE_DM" --duration "$DURATION" --placement "$placement"; stop_nodes
    done
    echo "== dm, 1 node, $RATE_DM msg/s, run $run"
    start_nodes 1; load dm --pairs 50 --rate "$RATE_DM" --duration "$DURATION"; stop_nodes
  done
}

group() {
  for run in $(seq 1 "$RUNS"); do
    for n in 1 3; do
      echo "== group of 5,000, $n node(s), $RATE_GROUP msg/s, run $run"
      start_nodes "$n"; load group --members 5000 --rate "$RATE_GROUP" --duration "$DURATION" --workers 2; stop_nodes
    done
  done
}

rehome() {
  for run in $(seq 1 "$RUNS"); do
    echo "== re-home after kill -9, run $run"
    start_nodes 3
    python3 benches/rehome.py --node http://127.0.0.1:18080 --kill-pid "$(pgrep -f 'node-name bench2 ')" \
      --conversations 60 --seconds 5
    stop_nodes
  done
}

case "${1:-all}" in
  dm) dm ;; group) group ;; rehome) rehome ;;
  all) dm; group; rehome ;;
  *) echo "usage: $0 [dm|group|rehome|all]" >&2; exit 2 ;;
esac
