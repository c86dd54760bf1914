#!/usr/bin/env bash
# Access tokens end to end on loopback: one keygate (the run.sh config plus
# `[tokens]`, a route taking `auth = ["key", "jwt"]`) in front of the plain
# nginx `return 200` upstream, driven with the API key and with one access
# token (JWT) traded for that key, reused: after its first request a token
# is verified from keygate's cache, so the target is the key's throughput
# (issue 20: JWT >= 0.95x key).
#
#   benches/e2e/tokens.sh              # 5 rounds of 5 s per credential
#   benches/e2e/tokens.sh --rounds 3 --seconds 3
#
# Options: --rounds N (5), --seconds N (5), --bin PATH (default
# target/release/keygate, built if missing), --keep (keep the temp dir).
# Runs alternate key, token, key, token...; printed: req/s per round, the
# medians, keygate's CPU per request from /proc, and the ratio.
# Needs redis-server, redis-cli, nginx, wrk, curl, python3.
set -euo pipefail

ROUNDS=5 SECONDS_PER=5 BIN="" KEEP=0
while (($#)); do
    case $1 in
        --rounds) ROUNDS=$2; shift ;;
        --seconds) SECONDS_PER=$2; shift ;;
        --bin) BIN=$2; shift ;;
        --keep) KEEP=1 ;;
        -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"
log() { printf '[tokens %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=lib.sh
source "$HERE/lib.sh" # cleanup on exit (PIDS, WORK), free_port, render, run_redis, cpu_ticks, require_tools, keygate_binary
require_tools redis-server redis-cli nginx wrk curl python3
BIN=$(keygate_binary "$BIN")

WORK=$(mktemp -d /tmp/keygate-tokens.XXXXXX)
for v in UP_PORT UP_H2_PORT REDIS_PORT KG_PORT; do free_port "$v"; done
KG_WORKERS=1
USER_LINE=""
(($(id -u) == 0)) && USER_LINE="user root;"
run_redis
start_nginx upstream-nginx.conf upstream "http://127.0.0.1:$UP_PORT/"

token_gateway # $WORK/gateway.toml with tokens on, and KEY
"$BIN" serve -c "$WORK/gateway.toml" >"$WORK/keygate.log" 2>&1 &
KG_PID=$!
PIDS+=("$KG_PID")
wait_http "http://127.0.0.1:$KG_PORT/"
URL="http://127.0.0.1:$KG_PORT/bench"
access_token
status() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
[[ $(status -H "x-api-key: $KEY" "$URL") == 200 ]] || die "GET with the key is not 200"
[[ $(status -H "Authorization: Bearer $TOKEN" "$URL") == 200 ]] || die "GET with the token is not 200"
[[ $(status -H "Authorization: Bearer ${TOKEN%?}x" "$URL") == 401 ]] || die "a tampered token is not 401"
log "key and token both answer 200, a tampered token 401; $ROUNDS rounds of ${SECONDS_PER}s each"

declare -A HEADER=([key]="x-api-key: $KEY" [jwt]="Authorization: Bearer $TOKEN")
declare -A RATES=() CPUS=()
for cred in key jwt; do wrk -t1 -c32 -d2s -H "${HEADER[$cred]}" "$URL" >/dev/null; done # warm-up
for ((r = 1; r <= ROUNDS; r++)); do
    for cred in key jwt; do
        read -r u0 s0 < <(cpu_ticks "$KG_PID")
        wrk -t1 -c32 -d"${SECONDS_PER}s" -H "${HEADER[$cred]}" "$URL" >"$WORK/$cred-$r.out" 2>&1
        read -r u1 s1 < <(cpu_ticks "$KG_PID")
        read -r reqs rate bad < <(parse "$WORK/$cred-$r.out")
        ((bad == 0)) || die "$cred round $r: $bad non-2xx answers or errors"
        RATES[$cred]+="$rate "
        CPUS[$cred]+="$(us_per_request $((u1 - u0 + s1 - s0)) "$reqs") "
        log "$cred round $r: $rate req/s"
    done
done
key_rate=$(median_of "${RATES[key]}") jwt_rate=$(median_of "${RATES[jwt]}")
key_cpu=$(median_of "${CPUS[key]}") jwt_cpu=$(median_of "${CPUS[jwt]}")
echo "credential | req/s (median of $ROUNDS) | rounds | keygate CPU per request"
echo "key        | $key_rate | ${RATES[key]}| $key_cpu us"
echo "jwt        | $jwt_rate | ${RATES[jwt]}| $jwt_cpu us"
awk -v a="$jwt_rate" -v b="$key_rate" -v c="$jwt_cpu" -v d="$key_cpu" \
    'BEGIN { printf "jwt/key: %.3f req/s, %.3f CPU per request\n", a / b, c / d }'
