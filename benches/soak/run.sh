#!/usr/bin/env bash
# keygate soak: mixed valid, invalid, over-limit and slow traffic for a
# bounded time while Redis is restarted twice and one upstream flaps; checks
# RSS/fd flatness, exact usage totals, zero unexpected 5xx, zero invalid keys
# admitted. Loopback only; needs redis-server, redis-cli and python3. Not
# part of CI. See the README's "Soak" section.
#
#   benches/soak/run.sh                  # release build, 10 minutes
#   benches/soak/run.sh --debug --duration 60
#   benches/soak/run.sh --bin PATH       # an existing keygate binary
#
# Other flags (--slow N, --workdir DIR) go to soak.py. Exit status: 0 when
# every check held, 1 when one failed, 2 on a setup error.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
profile=release
bin=""
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --debug) profile=debug; shift ;;
        --bin)
            [[ $# -ge 2 ]] || { echo "--bin needs a path" >&2; exit 2; }
            bin="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
for tool in redis-server redis-cli python3; do
    command -v "$tool" > /dev/null || { echo "soak: $tool is not installed" >&2; exit 2; }
done
if [[ -z "$bin" ]]; then
    if [[ "$profile" == release ]]; then
        cargo build --release --bin keygate --manifest-path "$root/Cargo.toml" >&2
    else
        cargo build --bin keygate --manifest-path "$root/Cargo.toml" >&2
    fi
    bin="$root/target/$profile/keygate"
fi
# The whole run is bounded even if something hangs: the traffic time plus
# ten minutes of set-up, settling and tear-down.
duration=600
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ "${args[$i]}" == --duration ]] && duration="${args[$((i + 1))]:-600}"
done
limit=$(python3 -c "print(int(float('$duration')) + 600)")
cd "$root"
exec timeout --kill-after=30 "$limit" python3 "$here/soak.py" --keygate "$bin" "${args[@]}"
