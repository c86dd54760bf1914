#!/usr/bin/env bash
# TLS end-to-end comparison on loopback: keygate, nginx and HAProxy each
# terminating TLS on the same certificate (ECDSA P-256, made here with
# openssl as a throwaway) in front of the same plain nginx `return 200`
# upstream, each doing its key check and per-key limit as in run.sh.
#
#   benches/e2e/tls.sh            # full run, about 10 minutes
#   benches/e2e/tls.sh --quick    # short runs, about 3 minutes
#
# Options: --quick, --no-install (use what is on PATH), --no-build (use the
# existing target/release/keygate), --keep (keep the temp dir with the logs).
# Environment: WORKERS=N runs every proxy with N workers/threads (default 1).
#
# Workloads (runs alternate keygate, nginx, haproxy; 3 rounds; medians):
#   get     keep-alive small GET over TLS (wrk -t1 -c32)
#   h2      HTTP/2 over TLS, ALPN h2 (h2load -t1 -c32 -m10)
#   close   a new connection and a full handshake per request (wrk -c32,
#           Connection: close; wrk keeps no TLS session, so nothing resumes)
#   new     handshakes one after another, each a full one (openssl s_time -new)
#   resume  handshakes one after another, resuming the first session
#           (openssl s_time -reuse); the table says how many did resume
# Then the resident memory one idle TLS connection costs (idle.py --cafile).
# Results are printed and written to bench-results/tls-<date>.md.
set -euo pipefail

QUICK=0 INSTALL=1 BUILD=1 KEEP=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        --no-install) INSTALL=0 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"

if ((QUICK)); then DUR=2 WARM=1 IDLE=500; else DUR=8 WARM=2 IDLE=2000; fi
ROUNDS=3
CONNS=32
TARGETS=(keygate nginx haproxy)
WORKLOADS=(get h2 close new resume)
declare -A WORKLOAD_NAME=(
    [get]="small GET over TLS, keep-alive (wrk -t1 -c$CONNS)"
    [h2]="HTTP/2 over TLS (h2load -t1 -c$CONNS -m10)"
    [close]="new connection + full handshake per request (wrk -t1 -c$CONNS, Connection: close)"
    [new]="full handshakes, one at a time (openssl s_time -new)"
    [resume]="resumed handshakes, one at a time (openssl s_time -reuse)"
)

log() { printf '[tls %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# === 1. Tools ===

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
if ((${#need[@]})); then
    ((INSTALL)) || die "missing ${need[*]} (and --no-install was given)"
    sudo=()
    (($(id -u) == 0)) || sudo=(sudo)
    log "installing ${need[*]}"
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi

if ((BUILD)); then
    log "building keygate (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet)
fi
KEYGATE="$ROOT/target/release/keygate"
[[ -x $KEYGATE ]] || die "$KEYGATE not found (build it or drop --no-build)"

# === 2. Certificate and servers, each on a free loopback port ===

# shellcheck source=lib.sh
source "$HERE/lib.sh"
WORK=$(mktemp -d /tmp/keygate-tls.XXXXXX)
for v in UP_PORT UP_H2_PORT REDIS_PORT KG_PORT NGINX_PORT HAPROXY_PORT; do free_port "$v"; done
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
WORKERS=${WORKERS:-1}
KG_WORKERS=${KG_WORKERS:-$WORKERS}
[[ $WORKERS =~ ^[1-9][0-9]*$ && $KG_WORKERS =~ ^[1-9][0-9]*$ ]] || die "WORKERS and KG_WORKERS must be positive integers"
USER_LINE=""
if (($(id -u) == 0)); then USER_LINE="user root;"; fi
log "temp dir $WORK"

# A throwaway CA and a leaf for localhost / 127.0.0.1, both ECDSA P-256 (the
# curve every server here prefers; an RSA-2048 leaf makes every handshake
# several times dearer for all three alike).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=keygate bench CA" -keyout "$WORK/ca-key.pem" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=localhost" -keyout "$WORK/bench-key.pem" -out "$WORK/bench.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$WORK/san.ext"
openssl x509 -req -in "$WORK/bench.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca-key.pem" -CAcreateserial \
    -days 2 -extfile "$WORK/san.ext" -out "$WORK/bench-cert.pem" 2>/dev/null
cat "$WORK/bench-cert.pem" "$WORK/bench-key.pem" >"$WORK/bench-both.pem"

run_redis
start_nginx upstream-nginx.conf upstream "http://127.0.0.1:$UP_PORT/"

# keygate: run.sh's config with the plain listener swapped for a TLS one.
render "$HERE/gateway.toml" "$WORK/gateway.toml"
cat "$WORK/gateway.toml" "$HERE/usage.toml" >"$WORK/gateway-usage.toml"
if "$KEYGATE" check -c "$WORK/gateway-usage.toml" >"$WORK/check-usage.log" 2>&1; then
    mv "$WORK/gateway-usage.toml" "$WORK/gateway.toml"
fi
sed -i -e '/^listen = /d' -e 's/^\[server\]$/[server]\nmax_connections_per_ip = 10000/' "$WORK/gateway.toml"
cat >>"$WORK/gateway.toml" <<TOML

[[server.listener]]
listen = "127.0.0.1:$KG_PORT"
tls = { cert = "$WORK/bench-cert.pem", key = "$WORK/bench-key.pem" }
TOML
"$KEYGATE" check -c "$WORK/gateway.toml" >"$WORK/check.log" 2>&1 || die "keygate check rejected $WORK/gateway.toml: $(cat "$WORK/check.log")"

KEY=$("$KEYGATE" keys -c "$WORK/gateway.toml" --redis "$REDIS_URL" issue --client bench \
    --scopes read-write --rate 1000000000/s 2>>"$WORK/issue.log")
[[ $KEY == kg_* ]] || die "keys issue printed no key (see $WORK/issue.log)"
printf '"%s" "bench";\n' "$KEY" >"$WORK/keys.nginx-map"
printf '%s bench\n' "$KEY" >"$WORK/keys.haproxy-map"

CURL_TLS=(--cacert "$WORK/ca.pem" --resolve "localhost:$KG_PORT:127.0.0.1")
"$KEYGATE" serve -c "$WORK/gateway.toml" >"$WORK/keygate.log" 2>&1 &
PIDS+=($!)
KG_PID=$!
wait_http "https://localhost:$KG_PORT/" "${CURL_TLS[@]}"

start_nginx proxy-nginx-tls.conf proxy-nginx-tls "https://127.0.0.1:$NGINX_PORT/" -k
NGINX_PID=$!
render "$HERE/haproxy-tls.cfg" "$WORK/haproxy-tls.cfg"
haproxy -f "$WORK/haproxy-tls.cfg" -db >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
HAPROXY_PID=$!
wait_http "https://127.0.0.1:$HAPROXY_PORT/" -k

declare -A PORT=([keygate]=$KG_PORT [nginx]=$NGINX_PORT [haproxy]=$HAPROXY_PORT)
declare -A PID=([keygate]=$KG_PID [nginx]=$NGINX_PID [haproxy]=$HAPROXY_PID)

# Every target answers as expected, over a verified TLS connection, before
# anything is measured.
status() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
expect() {
    local want=$1 what=$2 got
    shift 2
    got=$(status "$@")
    [[ $got == "$want" ]] || die "$what: expected $want, got $got"
}
for t in "${TARGETS[@]}"; do
    p=${PORT[$t]}
    tls=(--cacert "$WORK/ca.pem" --resolve "localhost:$p:127.0.0.1")
    url="https://localhost:$p/bench"
    expect 200 "$t GET over TLS" "${tls[@]}" -H "x-api-key: $KEY" "$url"
    expect 200 "$t HTTP/2 over TLS" "${tls[@]}" --http2 -H "x-api-key: $KEY" "$url"
    [[ $(curl -s -o /dev/null -w '%{http_version}' "${tls[@]}" --http2 -H "x-api-key: $KEY" "$url") == 2 ]] ||
        die "$t did not pick h2 over ALPN"
    expect 401 "$t GET without key" "${tls[@]}" "$url"
    # Only TLS 1.2 and 1.3 are offered.
    if openssl s_client -connect "127.0.0.1:$p" -tls1_1 </dev/null >/dev/null 2>&1; then
        die "$t accepted TLS 1.1"
    fi
done
log "all targets answer 200 with a key and 401 without, h2 over ALPN, no TLS 1.1"

# === 3. Measuring ===

# run_load WORKLOAD TARGET SECONDS OUT
run_load() {
    local w=$1 t=$2 d=$3 out=$4 url="https://127.0.0.1:${PORT[$2]}/bench"
    case $w in
        get) wrk -t1 -c"$CONNS" -d"${d}s" -H "x-api-key: $KEY" "$url" ;;
        close) wrk -t1 -c"$CONNS" -d"${d}s" -H "x-api-key: $KEY" -H "Connection: close" "$url" ;;
        h2) h2load -t1 -c"$CONNS" -m10 -D "$d" -H "x-api-key: $KEY" "$url" ;;
        new) openssl s_time -connect "127.0.0.1:${PORT[$t]}" -new -time "$d" ;;
        # -www: read an answer, so a TLS 1.3 ticket (sent after the handshake)
        # arrives before the session is reused.
        resume) openssl s_time -connect "127.0.0.1:${PORT[$t]}" -reuse -www /bench -time "$d" ;;
    esac >"$out" 2>&1 || true
}

# s_time prints `*` for each new handshake and `r` for each resumed one.
# Only the lines made of those marks count (its prose has r's too).
marks() { grep -E '^[r*]+$' "$1" | tr -d '\n' || true; }
resumed_count() { marks "$1" | tr -cd 'r' | wc -c; }
handshake_count() { marks "$1" | wc -c; }

rss_kib() {
    local total=0 p
    for p in $(tree_pids "$1"); do
        total=$((total + $(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

declare -A RATES=() CPUS=() BAD=() RESUMED=()
log "warm-up (${WARM}s per target)"
for t in "${TARGETS[@]}"; do run_load get "$t" "$WARM" "$WORK/warm.out"; done

total_runs=$((${#WORKLOADS[@]} * ROUNDS * ${#TARGETS[@]}))
n=0
for w in "${WORKLOADS[@]}"; do
    for ((r = 1; r <= ROUNDS; r++)); do
        for t in "${TARGETS[@]}"; do
            n=$((n + 1))
            out="$WORK/$w-$t-$r.out"
            read -r user_before system_before < <(cpu_ticks "${PID[$t]}")
            run_load "$w" "$t" "$DUR" "$out"
            read -r user_after system_after < <(cpu_ticks "${PID[$t]}")
            cpu=$((user_after - user_before + system_after - system_before))
            if [[ $w == new || $w == resume ]]; then
                # s_time's own count and rate line; CPU per handshake.
                reqs=$(handshake_count "$out")
                rate=$(awk -v n="$reqs" -v d="$DUR" 'BEGIN { printf "%.0f", n / d }')
                bad=0
                RESUMED[$w,$t]+="$(awk -v a="$(resumed_count "$out")" -v b="$reqs" 'BEGIN { printf "%.0f", b ? 100 * a / b : 0 }') "
            else
                read -r reqs rate bad < <(parse "$out")
            fi
            RATES[$w,$t]+="$rate "
            BAD[$w,$t]=$((${BAD[$w,$t]:-0} + bad))
            if ((reqs > 0)); then CPUS[$w,$t]+="$(us_per_request "$cpu" "$reqs") "; fi
            log "[$n/$total_runs] $w $t round $r: $rate per second${bad:+ ($bad bad)}"
        done
    done
done

# Resident memory per idle TLS connection: IDLE connections, one request each.
declare -A IDLE_KIB=()
for t in "${TARGETS[@]}"; do
    line=$(python3 "$HERE/idle.py" --port "${PORT[$t]}" --pid "${PID[$t]}" --count "$IDLE" \
        --key "$KEY" --cafile "$WORK/ca.pem" 2>&1 | tail -1) || true
    IDLE_KIB[$t]=$(sed -n 's/.*; \([0-9.]*\) KiB per idle connection/\1/p' <<<"$line")
    log "idle $t: $line"
done

# === 4. Report ===

fmt_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }
report() {
    local w t
    echo "# keygate TLS end-to-end benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- command: \`benches/e2e/tls.sh$( ((QUICK)) && echo ' --quick')\`; keygate $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')"
    echo "- machine: $(nproc) cores, $(uname -sr); $(nginx -v 2>&1 | sed 's/.*: //'), HAProxy $(haproxy -v | awk 'NR == 1 { print $3 }'), $(openssl version | awk '{ print $1, $2 }') (clients, nginx, HAProxy); keygate: rustls with the ring provider"
    echo "- certificate: ECDSA P-256 leaf from a throwaway CA; TLS 1.2 + 1.3 offered by all three; session tickets and caches on"
    echo "- each run ${DUR}s, $ROUNDS rounds alternating keygate, nginx, haproxy; medians. keygate $KG_WORKERS worker(s), nginx $WORKERS, HAProxy nbthread $WORKERS; the keygate route needs a key, a scope and a per-key rate, as in run.sh"
    echo
    echo "## Rate (req/s or handshakes/s, median of $ROUNDS) and CPU per request or handshake (µs, the proxy process)"
    echo
    echo "| workload | keygate | nginx | haproxy | keygate/nginx | keygate/haproxy | CPU keygate/nginx | CPU keygate/haproxy |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for w in "${WORKLOADS[@]}"; do
        local -A m=() c=()
        local cells=""
        for t in "${TARGETS[@]}"; do
            m[$t]=$(median_of "${RATES[$w,$t]:-}")
            c[$t]=$(median_of "${CPUS[$w,$t]:-}")
            local extra=""
            if ((${BAD[$w,$t]:-0} > 0)); then extra+=" (${BAD[$w,$t]} bad!)"; fi
            if [[ -n ${RESUMED[$w,$t]:-} && $w == resume ]]; then extra+=", $(median_of "${RESUMED[$w,$t]}")% resumed"; fi
            cells+=" ${m[$t]} / ${c[$t]} µs$extra |"
        done
        echo "| ${WORKLOAD_NAME[$w]} |$cells $(fmt_ratio "${m[keygate]}" "${m[nginx]}") | $(fmt_ratio "${m[keygate]}" "${m[haproxy]}") | $(fmt_ratio "${c[keygate]}" "${c[nginx]}") | $(fmt_ratio "${c[keygate]}" "${c[haproxy]}") |"
    done
    echo
    echo "Every round's rate, to judge the noise:"
    echo
    for w in "${WORKLOADS[@]}"; do
        local line="- $w:"
        for t in "${TARGETS[@]}"; do line+=" $t ${RATES[$w,$t]% };"; done
        echo "${line%;}"
    done
    echo
    echo "## Resident memory per idle TLS connection ($IDLE connections, one request each; idle.py --cafile)"
    echo
    echo "| keygate | nginx | haproxy |"
    echo "|---:|---:|---:|"
    echo "| ${IDLE_KIB[keygate]:-n/a} KiB | ${IDLE_KIB[nginx]:-n/a} KiB | ${IDLE_KIB[haproxy]:-n/a} KiB |"
}

mkdir -p "$ROOT/bench-results"
RESULT="$ROOT/bench-results/tls-$(date '+%Y%m%d-%H%M%S').md"
report | tee "$RESULT"
log "written to $RESULT"
