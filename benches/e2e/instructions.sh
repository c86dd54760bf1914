#!/usr/bin/env bash
# Instructions per request (callgrind) of keygate, by credential: the API
# key and one access token traded for it, reused. Counts are stable on a
# busy machine, unlike req/s, so they tell a few hundred instructions apart.
#
#   benches/e2e/instructions.sh                  # 20k requests per credential
#   benches/e2e/instructions.sh -n 5000 --bin target/release/keygate --keep
#
# The run.sh gateway (Redis store, scope, per-key rate limit, usage) plus
# `[tokens]` and a route taking `auth = ["key", "jwt"]`, one worker, under
# `valgrind --tool=callgrind --instr-atstart=no`; per credential: 2000
# warm-up requests, counters zeroed, N requests with `h2load --h1 -c32`,
# a dump. Printed: instructions per request (every thread of the process,
# so background tasks count too). The dumps stay in the temp dir with
# --keep (`callgrind_annotate DUMP` for the functions). Under valgrind
# SHA-256 runs without the CPU's SHA extensions: hashing weighs more here
# than natively.
# Needs valgrind, redis-server, nginx, h2load, curl, python3.
set -euo pipefail

N=20000 BIN="" KEEP=0
while (($#)); do
    case $1 in
        -n) N=$2; shift ;;
        --bin) BIN=$2; shift ;;
        --keep) KEEP=1 ;;
        -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "-n takes a positive integer" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"
log() { printf '[instructions %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=lib.sh
source "$HERE/lib.sh" # cleanup on exit (PIDS, WORK), free_port, render, run_redis, require_tools, keygate_binary
require_tools valgrind callgrind_control callgrind_annotate redis-server nginx h2load curl python3
BIN=$(keygate_binary "$BIN")

WORK=$(mktemp -d /tmp/keygate-instructions.XXXXXX)
for v in UP_PORT UP_H2_PORT REDIS_PORT KG_PORT; do free_port "$v"; done
KG_WORKERS=1
USER_LINE=""
(($(id -u) == 0)) && USER_LINE="user root;"
run_redis
start_nginx upstream-nginx.conf upstream "http://127.0.0.1:$UP_PORT/"

token_gateway # $WORK/gateway.toml with tokens on, and KEY
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.%p" \
    "$BIN" serve -c "$WORK/gateway.toml" >"$WORK/keygate.log" 2>&1 &
KG_PID=$!
PIDS+=("$KG_PID")
wait_http "http://127.0.0.1:$KG_PORT/"
URL="http://127.0.0.1:$KG_PORT/bench"
access_token
callgrind_control -i on "$KG_PID" >/dev/null 2>&1

declare -A HEADER=([key]="x-api-key: $KEY" [jwt]="Authorization: Bearer $TOKEN")
for cred in key jwt; do
    h2load --h1 -c32 -n 2000 -H "${HEADER[$cred]}" "$URL" >/dev/null
    callgrind_control -z "$KG_PID" >/dev/null 2>&1
    h2load --h1 -c32 -n "$N" -H "${HEADER[$cred]}" "$URL" >"$WORK/$cred.h2load"
    read -r done _ bad < <(parse "$WORK/$cred.h2load")
    ((done == N && bad == 0)) || die "$cred: $done of $N requests done, $bad failed or not 2xx"
    callgrind_control -d "$cred" "$KG_PID" >/dev/null 2>&1
    dump=$(ls -t "$WORK"/callgrind.*.* | head -1)
    total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
    echo "$cred: $((total / N)) instructions per request ($total over $N)"
    if ((KEEP)); then log "$cred: callgrind_annotate $dump"; fi
done
