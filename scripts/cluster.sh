#!/usr/bin/env bash
# Try a Redis Cluster on one machine: 3 primaries + 3 replicas from
# `redis-server` processes on loopback ports (never 6379), joined with
# `redis-cli --cluster create`, the same way the tests do (tests/common/cluster.rs).
#
#   scripts/cluster.sh            # start; prints the seed nodes, Ctrl-C stops and deletes everything
#   BASE_PORT=7100 scripts/cluster.sh
#
# Data lives in a temp dir with no persistence; the nodes die with the script.
set -euo pipefail

base=${BASE_PORT:-7000}
dir=$(mktemp -d "${TMPDIR:-/tmp}/keygate-cluster.XXXXXX")
pids=()
stop() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap stop EXIT INT TERM

addrs=()
for i in 0 1 2 3 4 5; do
    port=$((base + i))
    [ "$port" -ne 6379 ] || { echo "refusing port 6379" >&2; exit 2; }
    mkdir -p "$dir/$port"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$dir/$port" --logfile "$dir/$port/redis.log" \
        --cluster-enabled yes --cluster-config-file nodes.conf \
        --cluster-node-timeout 1000 --cluster-port $((port + 10000)) \
        --repl-diskless-sync-delay 0 &
    pids+=($!)
    addrs+=("127.0.0.1:$port")
done
for addr in "${addrs[@]}"; do
    until redis-cli -h 127.0.0.1 -p "${addr#*:}" ping >/dev/null 2>&1; do sleep 0.05; done
done
redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
for addr in "${addrs[@]}"; do
    until redis-cli -p "${addr#*:}" cluster info | grep -q '^cluster_state:ok'; do sleep 0.05; done
done

nodes=$(printf '"redis://%s", ' "${addrs[@]}")
echo "cluster ready: ${addrs[*]}"
echo "seed nodes:    [${nodes%, }]"
echo "inspect:       redis-cli -c -p $base cluster nodes"
echo "failover:      kill a primary (pids: ${pids[*]}); a replica takes over within ~2 s"
echo "logs:          $dir/<port>/redis.log   (Ctrl-C stops and deletes the cluster)"
wait
