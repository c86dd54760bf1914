# Shared by run.sh and many_keys.sh (sourced, not run): the temp dir and
# server processes cleaned up on exit, and free loopback ports.
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
