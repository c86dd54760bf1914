#!/usr/bin/env bash
# Where keygate's CPU per small GET goes, against nginx and against a floor.
#
#   benches/e2e/anatomy.sh                 # 5 alternating rounds of 4 s, about 2 minutes
#   benches/e2e/anatomy.sh --rounds 3 --duration 8 --no-build --keep
#
# Four proxies in front of the same nginx `return 200` upstream, one worker
# each, driven in turn with `wrk -t1 -c32` (A B C D A B C D ...):
#   keygate       everything on, as in run.sh (Redis store, cached key,
#                 scope, per-key rate limit, usage tracking)
#   keygate-bare  the same binary with the route public and usage off: no
#                 key, no limit, no usage; what is left is keygate's proxy
#                 core (hyper's HTTP/1 server and client, tokio, the pool)
#   nginx         run.sh's nginx proxy (key map, limit_req)
#   floor         benches/e2e/floor: the least a tokio proxy does per request
#                 (httparse both ways, a key compare, a rewritten head)
# and prints medians of req/s and of user, system and total CPU µs per
# request (from /proc). keygate minus keygate-bare is what keygate's own
# steps cost; keygate-bare minus floor is what the HTTP machinery costs.
# Needs nginx, wrk, redis-server and cargo (run.sh installs the first three).
set -euo pipefail

ROUNDS=5 DUR=4 BUILD=1 KEEP=0
while (($#)); do
    case $1 in
        --rounds | --duration)
            (($# >= 2)) || { echo "$1 needs a value (try --help)" >&2; exit 2; }
            if [[ $1 == --rounds ]]; then ROUNDS=$2; else DUR=$2; fi
            shift ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ && $DUR =~ ^[1-9][0-9]*$ ]] || { echo "--rounds and --duration take positive integers" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"
log() { printf '[anatomy %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
for tool in nginx wrk redis-server redis-cli curl cargo; do
    command -v "$tool" >/dev/null || die "$tool is not installed (benches/e2e/run.sh installs what it needs)"
done

KEYGATE="$ROOT/target/release/keygate"
FLOOR="$ROOT/target/floor/release/keygate-floor"
if ((BUILD)); then
    log "building keygate and the floor (release)"
    (cd "$ROOT" && cargo build --release --quiet)
fi
# The floor is small: always built (a no-op when up to date), in its own target dir.
cargo build --release --quiet --manifest-path "$HERE/floor/Cargo.toml" --target-dir "$ROOT/target/floor"
[[ -x $KEYGATE ]] || die "$KEYGATE not found (build it or drop --no-build)"

# shellcheck source=lib.sh
source "$HERE/lib.sh" # cleanup on exit, free_port, start_nginx, run_redis, cpu_ticks, parse, median_of
WORK=$(mktemp -d /tmp/keygate-anatomy.XXXXXX)
for v in UP_PORT UP_H2_PORT REDIS_PORT KG_PORT BARE_PORT NGINX_PORT NGINX_H2_PORT FLOOR_PORT; do
    free_port "$v"
done
WORKERS=1 KG_WORKERS=1 HAPROXY_PORT=0 HAPROXY_H2_PORT=0
USER_LINE=""
if (($(id -u) == 0)); then USER_LINE="user root;"; fi

run_redis
start_nginx upstream-nginx.conf upstream "http://127.0.0.1:$UP_PORT/"

# keygate with everything on, and the bare one: route public, usage off.
render "$HERE/gateway.toml" "$WORK/gateway.toml"
cat "$HERE/usage.toml" >>"$WORK/gateway.toml"
sed -e "s|^listen = .*|listen = \"127.0.0.1:$BARE_PORT\"|" -e 's|^scopes = .*|public = true|' \
    -e 's|^enabled = true|enabled = false|' "$WORK/gateway.toml" >"$WORK/bare.toml"
for config in gateway bare; do
    "$KEYGATE" check -c "$WORK/$config.toml" >&2 || die "keygate check rejected $WORK/$config.toml"
done
KEY=$("$KEYGATE" keys -c "$WORK/gateway.toml" issue --client bench --scopes read-write \
    --rate 1000000000/s 2>>"$WORK/issue.log")
[[ $KEY == kg_* ]] || die "keys issue printed no key (see $WORK/issue.log)"
printf '"%s" "bench";\n' "$KEY" >"$WORK/keys.nginx-map"

"$KEYGATE" serve -c "$WORK/gateway.toml" >"$WORK/keygate.log" 2>&1 &
PIDS+=($!)
KG_PID=$!
"$KEYGATE" serve -c "$WORK/bare.toml" >"$WORK/keygate-bare.log" 2>&1 &
PIDS+=($!)
BARE_PID=$!
start_nginx proxy-nginx.conf proxy-nginx "http://127.0.0.1:$NGINX_PORT/"
NGINX_PID=$!
"$FLOOR" "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$UP_PORT" "$KEY" &
PIDS+=($!)
FLOOR_PID=$!

TARGETS=(keygate keygate-bare nginx floor)
declare -A PORT=([keygate]=$KG_PORT [keygate-bare]=$BARE_PORT [nginx]=$NGINX_PORT [floor]=$FLOOR_PORT)
declare -A PID=([keygate]=$KG_PID [keygate-bare]=$BARE_PID [nginx]=$NGINX_PID [floor]=$FLOOR_PID)
for t in "${TARGETS[@]}"; do
    url="http://127.0.0.1:${PORT[$t]}/bench"
    wait_http "$url" -H "x-api-key: $KEY"
    got=$(curl -s -o /dev/null -w '%{http_code}' -H "x-api-key: $KEY" "$url")
    [[ $got == 200 ]] || die "$t: expected 200 with the key, got $got"
done
# The bare keygate takes any request; the others must refuse a wrong key (the
# floor by closing the connection), or a fast refusal would look like speed.
for t in keygate nginx floor; do
    got=$(curl -s -o /dev/null -w '%{http_code}' -H "x-api-key: $(wrong_key "$KEY")" "http://127.0.0.1:${PORT[$t]}/bench" || true)
    [[ $got != 200 ]] || die "$t answered 200 to a wrong key"
done
log "all four answer 200 with the key; $ROUNDS rounds of ${DUR}s each"

declare -A RATES=() USER=() SYSTEM=() TOTAL=()
for t in "${TARGETS[@]}"; do
    wrk -t1 -c32 -d1s -H "x-api-key: $KEY" "http://127.0.0.1:${PORT[$t]}/bench" >/dev/null # warm-up
done
for ((r = 1; r <= ROUNDS; r++)); do
    for t in "${TARGETS[@]}"; do
        read -r user_before system_before < <(cpu_ticks "${PID[$t]}")
        out="$WORK/$t-$r.out"
        wrk -t1 -c32 -d"${DUR}s" -H "x-api-key: $KEY" "http://127.0.0.1:${PORT[$t]}/bench" >"$out"
        read -r user_after system_after < <(cpu_ticks "${PID[$t]}")
        read -r n rate bad < <(parse "$out")
        ((bad == 0 && n > 0)) || die "$t round $r: errors or no requests: $(<"$out")"
        user=$(us_per_request $((user_after - user_before)) "$n")
        system=$(us_per_request $((system_after - system_before)) "$n")
        RATES[$t]+="$rate "
        USER[$t]+="$user "
        SYSTEM[$t]+="$system "
        TOTAL[$t]+="$(awk -v u="$user" -v s="$system" 'BEGIN { printf "%.2f", u + s }') "
        log "round $r $t: $rate req/s, user $user µs, system $system µs per request"
    done
done

nginx_total=$(median_of "${TOTAL[nginx]}")
echo
echo "## CPU per small GET (wrk -t1 -c32, ${DUR}s, medians of $ROUNDS alternating rounds, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown))"
echo
echo "| proxy | req/s | user µs | system µs | total µs | total / nginx |"
echo "|---|---:|---:|---:|---:|---:|"
for t in "${TARGETS[@]}"; do
    total=$(median_of "${TOTAL[$t]}")
    printf '| %s | %s | %s | %s | %s | %s |\n' "$t" "$(median_of "${RATES[$t]}")" "$(median_of "${USER[$t]}")" \
        "$(median_of "${SYSTEM[$t]}")" "$total" "$(awk -v a="$total" -v b="$nginx_total" 'BEGIN { printf "%.2f", a / b }')"
done
