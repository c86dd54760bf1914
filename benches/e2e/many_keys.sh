#!/usr/bin/env bash
# Many active keys, end to end: COUNT key records in a private Redis, HOT of
# them requested round robin through keygate (wrk + keys.lua, as README's
# "Performance" describes), with usage tracking off and on, alternating.
#
#   benches/e2e/many_keys.sh                       # 1M keys, 100k hot, 2 pairs of runs
#   benches/e2e/many_keys.sh --pairs 1 --rounds 3  # quicker
#
# Options: --count N (1000000), --hot N (100000), --pairs N (2: off, on, off,
# on), --rounds N (6 wrk runs of 10 s per measurement), --bin PATH (default
# target/release/keygate, built if missing), --baseline PATH (another build,
# e.g. of main: each pair also measures it with usage on, right after),
# --keep (keep the temp dir).
#
# Every measurement starts keygate on a fresh copy of the loaded Redis, warms
# its key cache (wrk until every hot key missed once), then runs ROUNDS x
# `wrk -t1 -c32 -d10s --latency`. Printed per measurement: req/s and p99 of
# each round, keygate's peak RSS, CPU of keygate's threads and Redis, and the
# usage writes Redis saw (INFO commandstats: calls and time of the write
# commands, and all commands per 1000 requests). Needs redis-server, redis-cli, nginx, wrk, curl, python3.
set -euo pipefail

COUNT=1000000 HOT=100000 PAIRS=2 ROUNDS=6 BIN="" BASELINE="" KEEP=0
while (($#)); do
    case $1 in
        --count) COUNT=$2; shift ;;
        --hot) HOT=$2; shift ;;
        --pairs) PAIRS=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --bin) BIN=$2; shift ;;
        --baseline) BASELINE=$2; shift ;;
        --keep) KEEP=1 ;;
        -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"
log() { printf '[many-keys %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=lib.sh
source "$HERE/lib.sh" # cleanup on exit (PIDS, WORK), free_port, start_nginx, require_tools, keygate_binary
require_tools redis-server redis-cli nginx wrk curl python3
BIN=$(keygate_binary "$BIN")

WORK=$(mktemp -d /tmp/keygate-many-keys.XXXXXX)
for v in UP_PORT UP_H2_PORT REDIS_PORT KG_PORT ADMIN_PORT; do free_port "$v"; done
USER_LINE=""
(($(id -u) == 0)) && USER_LINE="user root;"
render() {
    sed -e "s|@DIR@|$WORK|g" -e "s|@USER_LINE@|$USER_LINE|g" -e "s|@UP_PORT@|$UP_PORT|g" \
        -e "s|@UP_H2_PORT@|$UP_H2_PORT|g" -e "s|@REDIS_PORT@|$REDIS_PORT|g" \
        -e "s|@KG_PORT@|$KG_PORT|g" -e "s|@KG_WORKERS@|1|g" "$1" >"$2"
}
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }

REDIS_PID=""
start_redis() { # from the saved snapshot, if any: every measurement starts alike
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --dir "$WORK" \
        --dbfilename dump.rdb --logfile "$WORK/redis.log" --daemonize no &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    for ((i = 0; i < 600; i++)); do [[ $(rcli ping 2>/dev/null) == PONG ]] && return; sleep 0.1; done
    die "redis-server did not start (see $WORK/redis.log)"
}
stop_redis() {
    rcli shutdown nosave >/dev/null 2>&1 || true
    wait "$REDIS_PID" 2>/dev/null || true
}

log "temp dir $WORK; loading $COUNT keys ($HOT hot) into Redis on port $REDIS_PORT"
start_redis
python3 "$HERE/many_keys.py" --count "$COUNT" --hot "$HOT" --hot-file "$WORK/hot.txt" \
    --redis-prefix kgbench: | rcli --pipe >"$WORK/load.log"
rcli save >/dev/null
stop_redis

start_nginx upstream-nginx.conf upstream "http://127.0.0.1:$UP_PORT/"
render "$HERE/gateway.toml" "$WORK/base.toml"
ADMIN=$(printf '\n[admin]\nlisten = "127.0.0.1:%s"\ntoken = "many-keys-bench-token-0123456789"\n' "$ADMIN_PORT")
{ cat "$WORK/base.toml" "$HERE/usage.toml"; echo "$ADMIN"; } >"$WORK/on.toml"
{ cat "$WORK/base.toml"; printf '\n[usage]\nenabled = false\n'; echo "$ADMIN"; } >"$WORK/off.toml"
"$BIN" check -c "$WORK/on.toml" >&2 && "$BIN" check -c "$WORK/off.toml" >&2

metric() { curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
redis_cpu() { rcli info cpu | awk -F: '/used_cpu_(sys|user):/ { s += $2 } END { printf "%.1f", s }'; }
thread_cpu() { # ms of CPU per thread name
    local t
    for t in /proc/"$1"/task/*; do echo "$(cat "$t/comm") $(cut -d' ' -f1 "$t/schedstat")"; done
}
run_wrk() { # run_wrk DURATION: the round-robin keys workload
    wrk -t1 -c32 -d"$1" --latency -s "$HERE/keys.lua" "http://127.0.0.1:$KG_PORT/api/orders" -- "$WORK/hot.txt"
}

measure() { # measure off|on LABEL [BINARY]
    local mode=$1 out="$WORK/$2" bin=${3:-$BIN}
    mkdir -p "$out"
    start_redis
    "$bin" serve -c "$WORK/$mode.toml" >"$out/keygate.log" 2>&1 &
    local kg=$!
    PIDS+=("$kg")
    for ((i = 0; i < 100; i++)); do curl -s -o /dev/null "http://127.0.0.1:$KG_PORT/" && break; sleep 0.1; done
    for ((i = 0; i < 4; i++)); do # warm-up: every hot key verified once
        run_wrk 30s >/dev/null
        (($(metric keygate_key_cache_misses_total) >= HOT)) && break
    done
    rcli config resetstat >/dev/null
    local r0 r1 rounds=""
    r0=$(redis_cpu)
    thread_cpu "$kg" >"$out/threads0"
    for ((r = 1; r <= ROUNDS; r++)); do
        run_wrk 10s >"$out/wrk-$r.txt"
        rounds+=" $(awk '/Requests\/sec/ { printf "%.0f", $2 }' "$out/wrk-$r.txt")/$(awk '$1 == "99%" { print $2 }' "$out/wrk-$r.txt")"
    done
    thread_cpu "$kg" >"$out/threads1"
    r1=$(redis_cpu)
    local hwm
    hwm=$(awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$kg/status")
    rcli info commandstats >"$out/commandstats"
    # What the gateway counted (its request metric and usage see the same
    # requests), to compare with what Redis holds after the final flush.
    local counted
    counted=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk '/^keygate_requests_total\{/ { n += $2 } END { printf "%d", n }')
    kill -TERM "$kg"
    wait "$kg" 2>/dev/null || true
    local in_redis="-"
    if [[ $mode == on ]]; then
        in_redis=$("$bin" usage -c "$WORK/on.toml" --since 2h --by day --json |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["totals"]["requests"])')
    fi
    stop_redis
    echo "$2: usage $mode ($bin)"
    echo "  req/s / p99 per 10 s round:$rounds"
    echo "  requests the gateway counted: $counted; in Redis after shutdown: $in_redis"
    echo "  keygate peak RSS ${hwm} MiB; Redis CPU $(awk -v a="$r0" -v b="$r1" 'BEGIN { printf "%.1f", b - a }') s"
    paste "$out/threads0" "$out/threads1" |
        awk '{ c[$1] += ($4 - $2) / 1e6 } END { for (k in c) if (c[k] > 0) printf "  thread %s: %.0f ms CPU\n", k, c[k] }'
    grep -E 'cmdstat_(multi|exec|hincrby|hset|expireat|zincrby|hgetall|evalsha):' "$out/commandstats" |
        sed -E 's/cmdstat_([a-z]+):calls=([0-9]+),usec=([0-9]+),usec_per_call=([0-9.]+).*/  redis \1: \2 calls, \3 us in all, \4 us each/' || true
    # Every command Redis ran during the rounds (those of scripts included,
    # as INFO counts them), but this script's own INFO and CONFIG calls.
    local commands requests
    commands=$(awk -F'[:=,]' '/^cmdstat_/ && $1 !~ /^cmdstat_(info|config)/ { n += $3 } END { print n + 0 }' "$out/commandstats")
    requests=$(cat "$out"/wrk-*.txt | awk '/requests in/ { n += $1 } END { print n + 0 }')
    echo "  redis commands: $commands for $requests requests, $(awk -v c="$commands" -v r="$requests" 'BEGIN { printf "%.1f", r ? c * 1000 / r : 0 }') per 1000"
}

for ((pair = 1; pair <= PAIRS; pair++)); do
    measure off "off-$pair"
    measure on "on-$pair"
    if [[ -n $BASELINE ]]; then measure on "baseline-on-$pair" "$BASELINE"; fi
done
