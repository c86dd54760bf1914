# shellcheck shell=bash
# Shared by run.sh, anatomy.sh, instructions.sh, many_keys.sh and tokens.sh (sourced, not run): the temp dir and
# server processes cleaned up on exit, free loopback ports, config templates and
# nginx from them, a private redis-server, CPU time read from /proc, load tool
# output parsed, medians, and the tokens-on gateway of tokens.sh and instructions.sh.
#
# The sourcing script sets KEEP (1: keep the temp dir) and defines log()
# before sourcing; it then creates WORK and appends server PIDs to PIDS.

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -n ${WORK:-} ]]; then
        if ((KEEP)); then log "kept $WORK"; else rm -rf "$WORK"; fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# require_tools TOOL...: stops with the first one that is not on PATH.
require_tools() {
    local tool
    for tool in "$@"; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
}

# keygate_binary [PATH]: PATH if given, else target/release/keygate under
# $ROOT (built if missing); stops if there is none.
keygate_binary() {
    local bin=${1:-}
    if [[ -z $bin ]]; then
        bin="${CARGO_TARGET_DIR:-$ROOT/target}/release/keygate"
        [[ -x $bin ]] || (cd "$ROOT" && cargo build --release --quiet >&2)
    fi
    [[ -x $bin ]] || die "$bin not found"
    echo "$bin"
}

# free_port VAR: a loopback port nothing uses, never 6379, never handed out twice.
# Below the kernel's ephemeral range, so no client's outgoing connection can
# take it between this check and the server's bind.
TAKEN=" "
EPHEMERAL_LOW=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % (EPHEMERAL_LOW - 20000)))
        [[ $p == 6379 || $TAKEN == *" $p "* ]] && continue
        ss -Htan "sport = :$p" | grep -q . && continue
        TAKEN+="$p "
        printf -v "$1" '%s' "$p"
        return
    done
}

# render TEMPLATE OUT: fill in the @NAME@ placeholders from the variables of
# the same name (one a script does not use stays empty).
render() {
    sed -e "s|@DIR@|$WORK|g" -e "s|@USER_LINE@|${USER_LINE:-}|g" \
        -e "s|@UP_PORT@|${UP_PORT:-}|g" -e "s|@UP_H2_PORT@|${UP_H2_PORT:-}|g" \
        -e "s|@REDIS_PORT@|${REDIS_PORT:-}|g" -e "s|@KG_PORT@|${KG_PORT:-}|g" -e "s|@KG_WORKERS@|${KG_WORKERS:-}|g" \
        -e "s|@WORKERS@|${WORKERS:-}|g" \
        -e "s|@NGINX_PORT@|${NGINX_PORT:-}|g" -e "s|@NGINX_H2_PORT@|${NGINX_H2_PORT:-}|g" \
        -e "s|@HAPROXY_PORT@|${HAPROXY_PORT:-}|g" -e "s|@HAPROXY_H2_PORT@|${HAPROXY_H2_PORT:-}|g" \
        -e "s|@OPENRESTY_PORT@|${OPENRESTY_PORT:-}|g" -e "s|@CADDY_PORT@|${CADDY_PORT:-}|g" \
        "$1" >"$2"
}

# wait_http URL [CURL ARGS...]: until something answers (any status), at most 15 s.
wait_http() {
    local url=$1 i
    shift
    for ((i = 0; i < 150; i++)); do
        curl -s -o /dev/null "$@" "$url" && return 0
        sleep 0.1
    done
    die "nothing answers at $url (logs in $WORK; rerun with --keep)"
}

# run_redis: a private redis-server on $REDIS_PORT that keeps nothing on disk.
run_redis() {
    local i
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir "$WORK" --logfile "$WORK/redis.log" --daemonize no &
    PIDS+=($!)
    for ((i = 0; i < 100; i++)); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis-cli -p "$REDIS_PORT" ping >/dev/null || die "private redis-server did not start"
}

CLK_TCK=$(getconf CLK_TCK)
# The process and its children (nginx's master and worker).
tree_pids() { echo "$1"; cat /proc/"$1"/task/*/children 2>/dev/null | tr ' ' '\n' | grep . || true; }
# cpu_ticks PID: "USER SYSTEM" clock ticks of the process and its children so far.
cpu_ticks() {
    local user=0 system=0 p s
    for p in $(tree_pids "$1"); do
        s=$(<"/proc/$p/stat") || continue
        s=${s##*) }
        read -r -a f <<<"$s"
        user=$((user + f[11]))     # utime
        system=$((system + f[12])) # stime
    done
    echo "$user $system"
}
# us_per_request TICKS REQUESTS: CPU µs per request.
us_per_request() { awk -v d="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { printf "%.2f", d / hz * 1e6 / n }'; }

# wrong_key KEY: the key with its last character changed (always changed:
# a key that already ends in `x` gets `y`), so it fails the checksum.
wrong_key() { if [[ $1 == *x ]]; then echo "${1%?}y"; else echo "${1%?}x"; fi; }

# start_nginx TEMPLATE NAME URL [CURL ARGS...]: renders $HERE/TEMPLATE to $WORK/NAME.conf,
# starts nginx with it (error log $WORK/NAME-error.log) and waits until URL
# answers. `$!` is nginx's PID afterwards.
start_nginx() {
    render "$HERE/$1" "$WORK/$2.conf"
    nginx -p "$WORK" -c "$WORK/$2.conf" -e "$WORK/$2-error.log" -g 'daemon off;' &
    PIDS+=($!)
    wait_http "$3" "${@:4}"
}

# parse OUT: "REQUESTS RATE BAD", BAD counting non-2xx answers and errors.
parse() {
    local out=$1
    if grep -q '^finished in' "$out"; then # h2load
        awk '
            /^finished in/ { gsub(",", ""); rate = $4 }
            /^requests:/ { done = $8; failed = $10 + $12 }
            /^status codes:/ { bad = $5 + $7 + $9 }
            END { printf "%d %.0f %d\n", done, rate, failed + bad }' "$out"
    else # wrk
        awk '
            /requests in/ { n = $1 }
            /^Requests\/sec:/ { rate = $2 }
            /Non-2xx or 3xx responses:/ { bad += $NF }
            /Socket errors:/ { gsub(",", ""); bad += $4 + $6 + $8 + $10 }
            END { printf "%d %.0f %d\n", n, rate, bad }' "$out"
    fi
}

# median: of the numbers on stdin, one a line ("n/a" if none).
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# median_of "VALUES": of a space-separated list, "n/a" entries left out.
# shellcheck disable=SC2086 # splits the list on purpose
median_of() { printf '%s\n' $1 | grep -v n/a | median; }

# token_gateway: renders $HERE/gateway.toml to $WORK/gateway.toml with
# `[tokens]` on and the route taking `auth = ["key", "jwt"]`, checks it, and
# issues the bench key into KEY (tokens.sh, instructions.sh).
token_gateway() {
    render "$HERE/gateway.toml" "$WORK/gateway.toml"
    python3 - "$WORK/gateway.toml" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
text = text.replace('scopes = ["read-write"]', 'scopes = ["read-write"]\nauth = ["key", "jwt"]', 1)
text += '\n[tokens]\nenabled = true\naccess_ttl = "1h"\n'
open(path, "w").write(text)
PY
    "$BIN" check -c "$WORK/gateway.toml" >&2 || die "keygate check rejected $WORK/gateway.toml"
    KEY=$("$BIN" keys -c "$WORK/gateway.toml" issue --client bench --scopes read-write --rate 1000000000/s)
    [[ $KEY == kg_* ]] || die "keys issue printed no key"
}

# access_token: sets TOKEN to an access token the gateway on $KG_PORT trades for $KEY.
access_token() {
    TOKEN=$(curl -s -X POST -H "Authorization: Bearer $KEY" -d grant_type=client_credentials \
        "http://127.0.0.1:$KG_PORT/oauth/token" | python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')
    [[ $TOKEN == *.*.* ]] || die "the token endpoint gave no access token"
}
