#!/usr/bin/env bash
# End-to-end comparison on loopback: the upstream directly, keygate, nginx and
# HAProxy (each configured to the closest equivalent of keygate's key check and
# per-key limit), and two same-work peers, the OpenResty engine of Kong/APISIX
# (nginx + Lua doing key-auth + local rate limiting + a usage counter) and
# Caddy (the Go engine class of Tyk/Traefik/KrakenD), all in front of the same
# nginx `return 200` upstream. The peers run the HTTP/1.1 workloads (not h2);
# a peer whose Debian packages cannot be installed is skipped and says so.
#
#   benches/e2e/run.sh            # full run, about 25 minutes (15 + the TLS run's 10)
#   benches/e2e/run.sh --quick    # short runs, about 7 minutes
#
# Options: --quick, --no-install (use what is on PATH), --no-build (use the
# existing target/release/keygate), --keep (keep the temp dir with the logs),
# --no-tls (skip the TLS workloads: tls.sh, run at the end with the same
# options, keygate, nginx and HAProxy terminating TLS on one certificate),
# --no-tokens (skip the access-token row: tokens.sh, run last, keygate with
# one reused JWT against keygate with the key it came from).
# Environment: WORKERS=N runs every proxy with N workers/threads (default 1).
#
# Runs alternate (direct, keygate, nginx, haproxy, openresty, caddy, then
# again: 3 rounds) and
# the tables give medians. Results are printed and written to
# bench-results/e2e-<date>.md. Installs what is missing from Debian packages
# (apt-get) and oha from crates.io; builds keygate in release mode.
set -euo pipefail

QUICK=0 INSTALL=1 BUILD=1 KEEP=0 TLS=1 TOKENS=1
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        --no-tls) TLS=0 ;;
        --no-tokens) TOKENS=0 ;;
        --no-install) INSTALL=0 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        -h | --help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"

if ((QUICK)); then DUR=2 LAT_DUR=3 WARM=1; else DUR=8 LAT_DUR=10 WARM=2; fi
ROUNDS=3
CONNS=32      # client connections for every workload
NKEYS=1000    # keys for the round-robin workload
TARGETS=(direct keygate nginx haproxy) # the peers join once installed
PEERS=(openresty caddy)
WORKLOADS=(get post h2 keys1000 close)
declare -A WORKLOAD_NAME=(
    [get]="small GET, keep-alive (wrk -t1 -c$CONNS)"
    [post]="POST 16 KiB body (wrk -t1 -c$CONNS)"
    [h2]="HTTP/2 (h2load -t1 -c$CONNS -m10)"
    [keys1000]="$NKEYS keys round robin (wrk -t1 -c$CONNS)"
    [close]="new connection per request (wrk -t1 -c$CONNS, Connection: close)"
)

log() { printf '[e2e %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# === 1. Tools ===

LATENCY_TOOL=1 LATENCY_SKIP_REASON=""
install_tools() {
    local need=()
    command -v nginx >/dev/null || need+=(nginx-light)
    command -v haproxy >/dev/null || need+=(haproxy)
    command -v wrk >/dev/null || need+=(wrk)
    command -v h2load >/dev/null || need+=(nghttp2-client)
    command -v redis-server >/dev/null || need+=(redis-server)
    command -v redis-cli >/dev/null || need+=(redis-tools)
    command -v curl >/dev/null || need+=(curl)
    if ((${#need[@]})); then
        ((INSTALL)) || die "missing ${need[*]} (and --no-install was given)"
        local sudo=()
        (($(id -u) == 0)) || sudo=(sudo)
        log "installing ${need[*]}"
        "${sudo[@]}" apt-get update
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
    fi
    install_peers
    # Fixed-rate latency: there is no wrk2 in Debian; oha's -q rate with
    # --latency-correction avoids coordinated omission.
    if ! command -v oha >/dev/null; then
        if ((INSTALL)) && command -v cargo >/dev/null; then
            log "installing oha (cargo install oha --locked)"
            cargo install oha --locked >&2 || true
        fi
        if ! command -v oha >/dev/null; then
            LATENCY_TOOL=0
            LATENCY_SKIP_REASON="oha is not installed and \`cargo install oha --locked\` did not provide it"
            log "warning: $LATENCY_SKIP_REASON; the latency table is skipped"
        fi
    fi
}

# The same-work peers: each is measured if its Debian packages are there (or
# install here), and skipped with the reason in PEER_SKIP otherwise, never fatal.
# resty.core comes from Debian's lua-resty-core (bookworm has it), which the
# lua module of Debian's nginx requires at start.
LUA_MODULE=/usr/share/nginx/modules/ngx_http_lua_module.so
RESTY_CORE=/usr/share/lua/5.1/resty/core.lua
declare -A PEER_SKIP=()
peer_missing() {
    case $1 in
        openresty) [[ -f $LUA_MODULE && -f $RESTY_CORE ]] || echo "libnginx-mod-http-lua lua-resty-core" ;;
        caddy) command -v caddy >/dev/null || echo caddy ;;
    esac
}
install_peers() {
    local p pkgs
    for p in "${PEERS[@]}"; do
        pkgs=$(peer_missing "$p")
        [[ -z $pkgs ]] && continue
        if ((INSTALL)); then
            log "installing $pkgs (for the $p peer)"
            local sudo=()
            (($(id -u) == 0)) || sudo=(sudo)
            # shellcheck disable=SC2086 # the package list splits on purpose
            { "${sudo[@]}" apt-get update && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y $pkgs; } >&2 ||
                log "warning: apt-get install $pkgs failed"
            pkgs=$(peer_missing "$p")
        fi
        if [[ -n $pkgs ]]; then
            PEER_SKIP[$p]="skipped: $pkgs not installed$( ((INSTALL)) || echo ' (--no-install)')"
            log "warning: the $p peer is ${PEER_SKIP[$p]}"
        fi
    done
}
install_tools
for p in "${PEERS[@]}"; do
    [[ -n ${PEER_SKIP[$p]:-} ]] || TARGETS+=("$p")
done

if ((BUILD)); then
    log "building keygate (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet)
fi
KEYGATE="$ROOT/target/release/keygate"
[[ -x $KEYGATE ]] || die "$KEYGATE not found (build it or drop --no-build)"

# === 2. Servers, each on a free loopback port, all killed on exit ===

# shellcheck source=lib.sh
source "$HERE/lib.sh"   # cleanup on exit (PIDS, WORK), free_port, render, run_redis, cpu_ticks
WORK=$(mktemp -d /tmp/keygate-e2e.XXXXXX)
for v in UP_PORT UP_H2_PORT REDIS_PORT KG_PORT NGINX_PORT NGINX_H2_PORT HAPROXY_PORT HAPROXY_H2_PORT OPENRESTY_PORT CADDY_PORT; do
    free_port "$v"
done
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
# Worker processes/threads of each proxy: keygate's `[server] workers`, nginx's
# worker_processes, HAProxy's nbthread. 1 gives each its best throughput here
# (client, upstream and proxy share two cores); WORKERS=2 trades some of it
# for a shorter latency tail. KG_WORKERS overrides keygate's alone.
WORKERS=${WORKERS:-1}
KG_WORKERS=${KG_WORKERS:-$WORKERS}
[[ $WORKERS =~ ^[1-9][0-9]*$ && $KG_WORKERS =~ ^[1-9][0-9]*$ ]] || die "WORKERS and KG_WORKERS must be positive integers"
USER_LINE=""
if (($(id -u) == 0)); then USER_LINE="user root;"; fi   # workers must reach the temp dir

log "temp dir $WORK"
run_redis

start_nginx upstream-nginx.conf upstream "http://127.0.0.1:$UP_PORT/"
UP_PID=$!

# keygate config: the template, plus the [usage] section if this build knows it.
render "$HERE/gateway.toml" "$WORK/gateway.toml"
# >>> USAGE TRACKING: the marked spot (see usage.toml) <<<
USAGE="OFF: this build's config has no [usage] section"
cat "$WORK/gateway.toml" "$HERE/usage.toml" >"$WORK/gateway-usage.toml"
if "$KEYGATE" check -c "$WORK/gateway-usage.toml" >"$WORK/check-usage.log" 2>&1; then
    mv "$WORK/gateway-usage.toml" "$WORK/gateway.toml"
    USAGE="ON ([usage] section accepted by keygate check)"
fi
"$KEYGATE" check -c "$WORK/gateway.toml" >&2 || die "keygate check rejected $WORK/gateway.toml"
log "usage tracking: $USAGE"

# Keys: the main one, then the rest of the $NKEYS for the round-robin workload.
issue() {
    "$KEYGATE" keys -c "$WORK/gateway.toml" --redis "$REDIS_URL" issue --client "$1" \
        --scopes read-write --rate 1000000000/s 2>>"$WORK/issue.log"
}
KEY=$(issue bench)
[[ $KEY == kg_* ]] || die "keys issue printed no key (see $WORK/issue.log)"
log "issuing $((NKEYS - 1)) more keys"
export -f issue
export KEYGATE WORK REDIS_URL
printf '%s\n' "$KEY" >"$WORK/keys.txt"
seq -f 'bench-%04g' 2 "$NKEYS" | xargs -P 4 -I{} bash -c 'issue {}' >>"$WORK/keys.txt"
(($(grep -c '^kg_' "$WORK/keys.txt") == NKEYS)) || die "could not issue $NKEYS keys (see $WORK/issue.log)"
awk '{ printf "\"%s\" \"bench-%04d\";\n", $1, NR }' "$WORK/keys.txt" >"$WORK/keys.nginx-map"
awk '{ printf "%s bench-%04d\n", $1, NR }' "$WORK/keys.txt" >"$WORK/keys.haproxy-map"
# Caddy's map entries; the OpenResty peer reads keys.txt itself (line N: bench-NNNN).
awk '{ printf "\t\t%s bench-%04d\n", $1, NR }' "$WORK/keys.txt" >"$WORK/keys.caddy-map"

"$KEYGATE" serve -c "$WORK/gateway.toml" >"$WORK/keygate.log" 2>&1 &
PIDS+=($!)
KG_PID=$!
wait_http "http://127.0.0.1:$KG_PORT/"

start_nginx proxy-nginx.conf proxy-nginx "http://127.0.0.1:$NGINX_PORT/"
NGINX_PID=$!

render "$HERE/haproxy.cfg" "$WORK/haproxy.cfg"
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
HAPROXY_PID=$!
wait_http "http://127.0.0.1:$HAPROXY_PORT/"

declare -A PORT=([direct]=$UP_PORT [keygate]=$KG_PORT [nginx]=$NGINX_PORT [haproxy]=$HAPROXY_PORT
    [openresty]=$OPENRESTY_PORT [caddy]=$CADDY_PORT)
declare -A H2PORT=([direct]=$UP_H2_PORT [keygate]=$KG_PORT [nginx]=$NGINX_H2_PORT [haproxy]=$HAPROXY_H2_PORT)
declare -A PID=([direct]=$UP_PID [keygate]=$KG_PID [nginx]=$NGINX_PID [haproxy]=$HAPROXY_PID)

if [[ -z ${PEER_SKIP[openresty]:-} ]]; then
    render "$HERE/openresty-keyauth.lua" "$WORK/openresty-keyauth.lua"
    start_nginx proxy-openresty.conf proxy-openresty "http://127.0.0.1:$OPENRESTY_PORT/"
    PID[openresty]=$!
fi
if [[ -z ${PEER_SKIP[caddy]:-} ]]; then
    render "$HERE/Caddyfile" "$WORK/Caddyfile"
    XDG_CONFIG_HOME="$WORK/caddy-config" XDG_DATA_HOME="$WORK/caddy-data" GOMAXPROCS=$WORKERS \
        caddy run --config "$WORK/Caddyfile" --adapter caddyfile >"$WORK/caddy.log" 2>&1 &
    PIDS+=($!)
    PID[caddy]=$!
    wait_http "http://127.0.0.1:$CADDY_PORT/"
fi

# serves WORKLOAD TARGET: whether TARGET runs WORKLOAD (the peers: HTTP/1.1 only).
serves() { [[ $1 != h2 || -n ${H2PORT[$2]:-} ]]; }

# Every path must answer as expected before anything is measured: a fast 401
# or 404 would look like a fast proxy.
status() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
expect() {
    local want=$1 what=$2 got
    shift 2
    got=$(status "$@")
    [[ $got == "$want" ]] || die "$what: expected $want, got $got"
}
head -c 16384 /dev/zero | tr '\0' x >"$WORK/body"
for t in "${TARGETS[@]}"; do
    url="http://127.0.0.1:${PORT[$t]}/bench"
    expect 200 "$t GET with key" -H "x-api-key: $KEY" "$url"
    expect 200 "$t POST 16 KiB" -H "x-api-key: $KEY" --data-binary "@$WORK/body" "$url"
    expect 200 "$t GET with key #$NKEYS" -H "x-api-key: $(tail -1 "$WORK/keys.txt")" "$url"
    if serves h2 "$t"; then
        expect 200 "$t HTTP/2" --http2-prior-knowledge -H "x-api-key: $KEY" "http://127.0.0.1:${H2PORT[$t]}/bench"
    fi
    if [[ $t != direct ]]; then
        expect 401 "$t GET without key" "$url"
        expect 401 "$t GET with a wrong key" -H "x-api-key: $(wrong_key "$KEY")" "$url"
    fi
done
log "all targets (${TARGETS[*]}) answer 200 with a key and 401 without"

# === 3. Measuring ===

rss_kib() {
    local total=0 p
    for p in $(tree_pids "$1"); do
        total=$((total + $(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# run_load WORKLOAD TARGET SECONDS OUT: drive the load; OUT gets the tool's output.
run_load() {
    local w=$1 t=$2 d=$3 out=$4 url="http://127.0.0.1:${PORT[$2]}/bench"
    case $w in
        get) wrk -t1 -c"$CONNS" -d"${d}s" -H "x-api-key: $KEY" "$url" ;;
        post) wrk -t1 -c"$CONNS" -d"${d}s" -H "x-api-key: $KEY" -s "$HERE/post.lua" "$url" ;;
        keys1000) wrk -t1 -c"$CONNS" -d"${d}s" -s "$HERE/keys.lua" "$url" -- "$WORK/keys.txt" ;;
        close) wrk -t1 -c"$CONNS" -d"${d}s" -H "x-api-key: $KEY" -H "Connection: close" "$url" ;;
        h2) h2load -t1 -c"$CONNS" -m10 -D "$d" -H "x-api-key: $KEY" "http://127.0.0.1:${H2PORT[$t]}/bench" ;;
    esac >"$out" 2>&1 || true
}

# Redis traffic during keygate's small-GET runs (INFO commandstats before and after).
commandstats() { redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | awk -F'[:=,]' '/^cmdstat_/ { sub("cmdstat_", "", $1); print $1, $3 }'; }
declare -A REDIS_CALLS=()
REDIS_REQUESTS=0

declare -A RATES=() CPUS=() USER_CPUS=() BAD=()
log "warm-up (${WARM}s per target and workload)"
for t in "${TARGETS[@]}"; do
    for w in get keys1000; do run_load "$w" "$t" "$WARM" "$WORK/warm.out"; done
done

total_runs=0
for w in "${WORKLOADS[@]}"; do
    for t in "${TARGETS[@]}"; do if serves "$w" "$t"; then total_runs=$((total_runs + ROUNDS)); fi; done
done
n=0
for w in "${WORKLOADS[@]}"; do
    for ((r = 1; r <= ROUNDS; r++)); do
        for t in "${TARGETS[@]}"; do
            serves "$w" "$t" || continue
            n=$((n + 1))
            out="$WORK/$w-$t-$r.out"
            if [[ $w == get && $t == keygate ]]; then commandstats >"$WORK/redis-before"; fi
            read -r user_before system_before < <(cpu_ticks "${PID[$t]}")
            run_load "$w" "$t" "$DUR" "$out"
            read -r user_after system_after < <(cpu_ticks "${PID[$t]}")
            user=$((user_after - user_before))
            cpu=$((user + system_after - system_before))
            read -r reqs rate bad < <(parse "$out")
            if [[ $w == get && $t == keygate ]]; then
                commandstats >"$WORK/redis-after"
                REDIS_REQUESTS=$((REDIS_REQUESTS + reqs))
                while read -r cmd calls; do
                    prev=$(awk -v c="$cmd" '$1 == c { print $2 }' "$WORK/redis-before")
                    d=$((calls - ${prev:-0}))
                    [[ $cmd == info ]] && d=$((d - 1)) # our own INFO
                    if ((d > 0)); then REDIS_CALLS[$cmd]=$((${REDIS_CALLS[$cmd]:-0} + d)); fi
                done <"$WORK/redis-after"
            fi
            RATES[$w,$t]+="$rate "
            BAD[$w,$t]=$((${BAD[$w,$t]:-0} + bad))
            if ((reqs > 0)); then
                CPUS[$w,$t]+="$(us_per_request "$cpu" "$reqs") "
                USER_CPUS[$w,$t]+="$(us_per_request "$user" "$reqs") "
            fi
            note=""
            if ((bad > 0)); then note=", $bad non-2xx or errors"; fi
            log "[$n/$total_runs] $w $t round $r: $rate req/s$note"
        done
    done
done

# Fixed-rate latency at half of nginx's measured small-GET maximum.
declare -A P50=() P99=() P999=()
LAT_RATE=""
if ((LATENCY_TOOL)); then
    # shellcheck disable=SC2086 # the rounds' rates, one a line
    LAT_RATE=$(printf '%s\n' ${RATES[get,nginx]} | median | awk '{ printf "%d", $1 / 2 }')
    for ((r = 1; r <= ROUNDS; r++)); do
        for t in "${TARGETS[@]}"; do
            out="$WORK/latency-$t-$r.json"
            oha --no-tui --output-format json -z "${LAT_DUR}s" -q "$LAT_RATE" --latency-correction \
                -c "$CONNS" -H "x-api-key: $KEY" "http://127.0.0.1:${PORT[$t]}/bench" >"$out" 2>"$WORK/oha.err" || true
            read -r p50 p99 p999 ok < <(python3 - "$out" <<'EOF' 2>/dev/null || echo "n/a n/a n/a 0"
import json, sys
d = json.load(open(sys.argv[1]))
p = d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
print("%.3f %.3f %.3f %d" % (p["p50"] * 1e3, p["p99"] * 1e3, p["p99.9"] * 1e3,
      1 if set(codes) == {"200"} else 0))
EOF
            )
            P50[$t]+="$p50 " P99[$t]+="$p99 " P999[$t]+="$p999 "
            if ((ok == 0)); then BAD[lat,$t]=1; fi
            log "latency $t round $r at $LAT_RATE req/s: p50 $p50 ms, p99 $p99 ms, p99.9 $p999 ms"
        done
    done
fi

declare -A RSS=()
for t in "${TARGETS[@]}"; do RSS[$t]=$(rss_kib "${PID[$t]}"); done

# === 4. Report ===

# range "VALUES": lowest-highest, to show how far the rounds spread.
# shellcheck disable=SC2086 # splits the list on purpose
range() { printf '%s\n' $1 | grep -v n/a | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { if (NR == 0) print "n/a"; else print lo "-" hi }'; }
# The peers' lines in the report.
declare -A PEER_DOC=(
    [openresty]="nginx + lua-nginx-module $WORKERS worker(s) (proxy-openresty.conf, openresty-keyauth.lua): access_by_lua does Kong's key-auth + rate-limiting (local policy) per request: key looked up (in clear) in a lua_shared_dict loaded at start -> 401, per-key per-second counter in a shared dict (429 over 1e9/s), usage counter, key header cleared, X-Consumer-ID set; upstream keepalive. A lower bound for Kong/APISIX (no router, plugin runner or PDK)"
    [caddy]="GOMAXPROCS=$WORKERS (Caddyfile): \`map\` of x-api-key -> client id (every issued key), \`vars\` matcher -> 401, key header removed, X-Consumer-ID set, reverse_proxy keep-alive; no rate limit or usage counter (none in Debian's caddy): a lower bound for a Go gateway"
)
peer_versions() {
    [[ -z ${PEER_SKIP[openresty]:-} ]] && printf ', lua-nginx-module %s + lua-resty-core %s' \
        "$(dpkg-query -W -f '${Version}' libnginx-mod-http-lua 2>/dev/null || echo '?')" \
        "$(dpkg-query -W -f '${Version}' lua-resty-core 2>/dev/null || echo '?')"
    [[ -z ${PEER_SKIP[caddy]:-} ]] && printf ', Caddy %s' "$(caddy version 2>/dev/null | awk '{ print $1 }')"
    return 0
}
fmt_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }
report() {
    local w t
    echo "# keygate end-to-end benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- command: \`benches/e2e/run.sh$( ((QUICK)) && echo ' --quick')$( ((TLS)) || echo ' --no-tls')\`; keygate $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')"
    echo "- machine: $(nproc) cores, $(uname -sr); $(nginx -v 2>&1 | sed 's/.*: //'), HAProxy $(haproxy -v | awk 'NR == 1 { print $3 }'), $(wrk -v 2>&1 | awk 'NR == 1 { print "wrk " $2 }'), $(h2load --version | awk '{ print $2 }'), $(redis-server --version | awk '{ print $3 }' | tr -d 'v=' | sed 's/^/redis /')$(peer_versions)"
    echo "- each run ${DUR}s, $CONNS connections, $ROUNDS rounds alternating ${TARGETS[*]}; medians shown"
    echo "- keygate: Redis store, key verified (cached after the first request), route requires scope read-write, per-key rate limit (1e9/s), usage tracking $USAGE; $KG_WORKERS worker thread(s) (\`[server] workers\`); access log off"
    echo "- nginx: $WORKERS worker(s); key map -> 401, limit_req per key, upstream keepalive. HAProxy: nbthread $WORKERS; key map -> 401, stick-table http_req_rate per key, http-reuse always. Both strip the key and send the client id upstream"
    local p
    for p in "${PEERS[@]}"; do
        if [[ -n ${PEER_SKIP[$p]:-} ]]; then
            echo "- $p peer: ${PEER_SKIP[$p]}"
        else
            echo "- $p peer: ${PEER_DOC[$p]}"
        fi
    done
    echo "- upstream: nginx 1 worker, \`return 200 \"ok\"\`; \"direct\" is the client against it"
    echo
    echo "## Throughput (req/s, median of $ROUNDS) and CPU per request (µs, the server process the client talks to)"
    echo
    local others=() head="| workload |" rule="|---|"
    for t in "${TARGETS[@]}"; do
        head+=" $t |" rule+="---:|"
        [[ $t == keygate ]] || others+=("$t")
    done
    for t in "${others[@]}"; do head+=" keygate/$t |" rule+="---:|"; done
    echo "$head"
    echo "$rule"
    for w in "${WORKLOADS[@]}"; do
        local -A m=()
        local cells="" ratios=""
        for t in "${TARGETS[@]}"; do
            if ! serves "$w" "$t"; then
                m[$t]=n/a cells+=" - |"
                continue
            fi
            m[$t]=$(median_of "${RATES[$w,$t]:-}")
            local c u
            c=$(median_of "${CPUS[$w,$t]:-}")
            u=$(median_of "${USER_CPUS[$w,$t]:-}")
            local flag=""
            if ((${BAD[$w,$t]:-0} > 0)); then flag=" (${BAD[$w,$t]} bad!)"; fi
            cells+=" ${m[$t]} / ${c} µs (${u} user)$flag |"
        done
        for t in "${others[@]}"; do ratios+=" $(fmt_ratio "${m[keygate]}" "${m[$t]}") |"; done
        echo "| ${WORKLOAD_NAME[$w]} |$cells$ratios"
    done
    echo
    echo "Cells: req/s / CPU µs per request (of which user space; the rest is the kernel's). \"bad\" counts non-2xx answers and socket errors over all rounds. \"-\": not run (the peers run HTTP/1.1 only). Ratios are of req/s."
    echo
    echo "Every round's req/s, to judge the noise:"
    echo
    for w in "${WORKLOADS[@]}"; do
        local line="- $w:"
        for t in "${TARGETS[@]}"; do serves "$w" "$t" && line+=" $t ${RATES[$w,$t]% };"; done
        echo "${line%;}"
    done
    echo
    if ((LATENCY_TOOL)); then
        echo "## Latency at a fixed rate of $LAT_RATE req/s (50% of nginx's small-GET max; oha -q --latency-correction, ${LAT_DUR}s, $CONNS connections, median of $ROUNDS)"
        echo
        echo "| target | p50 ms | p99 ms | p99 range ms | p99.9 ms | p99 added vs direct ms |"
        echo "|---|---:|---:|---:|---:|---:|"
        local d99
        d99=$(median_of "${P99[direct]:-}")
        for t in "${TARGETS[@]}"; do
            local p99
            p99=$(median_of "${P99[$t]:-}")
            local flag=""
            if [[ -n ${BAD[lat,$t]:-} ]]; then flag=" (non-200 answers!)"; fi
            echo "| $t$flag | $(median_of "${P50[$t]:-}") | $p99 | $(range "${P99[$t]:-}") | $(median_of "${P999[$t]:-}") | $(awk -v a="$p99" -v b="$d99" 'BEGIN { if (a == "n/a" || b == "n/a") print "n/a"; else printf "%.3f", a - b }') |"
        done
    else
        echo "## Latency: skipped ($LATENCY_SKIP_REASON)"
    fi
    echo
    echo "## Memory after the run (VmRSS, process and children)"
    echo
    local mhead="| direct (upstream) |" mrule="|---:|" mcells="| $((RSS[direct] / 1024)) MiB |"
    for t in "${others[@]}"; do
        [[ $t == direct ]] && continue
        mhead+=" $t |" mrule+="---:|" mcells+=" $((RSS[$t] / 1024)) MiB |"
    done
    echo "| keygate |${mhead#|}"
    echo "|---:|${mrule#|}"
    echo "| $((RSS[keygate] / 1024)) MiB |${mcells#|}"
    echo
    echo "## Redis traffic during keygate's small-GET runs (INFO commandstats)"
    echo
    local total=0 cmd detail=""
    for cmd in "${!REDIS_CALLS[@]}"; do
        total=$((total + REDIS_CALLS[$cmd]))
        detail+=" $cmd=${REDIS_CALLS[$cmd]}"
    done
    echo "$total commands over $REDIS_REQUESTS requests = $(awk -v c=$total -v n=$REDIS_REQUESTS 'BEGIN { printf "%.3f", n ? c * 1000 / n : 0 }') per 1000 requests${detail:+ (by command:$detail)}"
}

mkdir -p "$ROOT/bench-results"
RESULT="$ROOT/bench-results/e2e-$(date '+%Y%m%d-%H%M%S').md"
report | tee "$RESULT"
log "written to $RESULT"

# === 5. The TLS workloads (their own script and report; the build is reused) ===

if ((TLS)); then
    tls_args=(--no-build)
    ((QUICK)) && tls_args+=(--quick)
    ((INSTALL)) || tls_args+=(--no-install)
    ((KEEP)) && tls_args+=(--keep)
    # This run's servers go first, so nothing idles beside the TLS run.
    cleanup
    PIDS=() WORK=""
    log "TLS workloads: benches/e2e/tls.sh ${tls_args[*]}"
    "$HERE/tls.sh" "${tls_args[@]}"
fi

# === 6. Access tokens (their own script; the build is reused) ===

if ((TOKENS)); then
    tokens_args=(--bin "$ROOT/target/release/keygate")
    ((QUICK)) && tokens_args+=(--rounds 3 --seconds 2)
    ((KEEP)) && tokens_args+=(--keep)
    cleanup
    PIDS=() WORK=""
    log "access tokens: benches/e2e/tokens.sh ${tokens_args[*]}"
    "$HERE/tokens.sh" "${tokens_args[@]}"
fi
