#!/usr/bin/env bash
# Builds keygate's Debian package with cargo-deb, installs it on this machine
# with dpkg -i, checks what it installed, then purges it again. Needs root and
# a Debian-like system; CI (.ci/run) runs it after the tests.
#
#   dist/deb-check.sh            package the existing debug build (target/debug/keygate,
#                                what `cargo test` built): no second build in CI
#   dist/deb-check.sh --release  build and package a release binary (the one to ship)
#   KEEP=1 dist/deb-check.sh     leave the package installed afterwards
#
# Packaging the debug build is a check of the packaging (files, conffile,
# maintainer scripts, unit), not a package to ship: cargo-deb warns that the
# dev profile is unsupported for releases, and says so on every run.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
    echo "deb-check: FAILED: $*" >&2
    exit 1
}

release=false
case "${1:-}" in
    "") ;;
    --release) release=true ;;
    *) fail "unknown argument $1 (only --release)" ;;
esac
[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i)"
command -v dpkg >/dev/null || fail "needs dpkg (a Debian-like system)"
cargo deb --version >/dev/null 2>&1 || fail "needs cargo-deb: cargo install cargo-deb --locked"

out=target/debian/keygate-check.deb
rm -f "$out"
if $release; then
    echo "== deb: building a release binary and the package"
    cargo deb --locked -o "$out"
else
    echo "== deb: packaging the debug build"
    # The binary exactly as `cargo test` builds it: a no-op after the tests
    # (CI), and the current code when run alone. Not `cargo build`: without
    # the dev-dependencies' features (tokio's test-util) it is a different
    # build of tokio and keygate, and it measured 71 s after `cargo test` in CI.
    cargo test --locked --no-run --test cli
    # --fast: gzip-like compression; xz on a 36 MB debug binary costs 20 s.
    cargo deb --no-build --profile dev --fast -o "$out"
fi
[ -s "$out" ] || fail "cargo deb wrote no $out"

if dpkg-query -W -f='${Status}' keygate 2>/dev/null | grep -q 'ok installed'; then
    echo "== deb: purging the keygate package installed before"
    dpkg --purge keygate
fi
echo "== deb: dpkg -i $out"
dpkg -i "$out" || fail "dpkg -i"

echo "== deb: what it installed"
for file in /usr/bin/keygate /etc/keygate/gateway.toml /lib/systemd/system/keygate.service \
    /usr/share/doc/keygate/gateway.toml.example; do
    [ -e "$file" ] || fail "$file not installed"
done
dpkg-query -W -f='${Conffiles}' keygate | grep -q '/etc/keygate/gateway.toml' ||
    fail "/etc/keygate/gateway.toml is not a conffile"
getent passwd keygate >/dev/null || fail "no keygate user"
for dir in /var/lib/keygate /var/lib/keygate/keys; do
    [ "$(stat -c %U:%G "$dir")" = keygate:keygate ] || fail "$dir is not owned by keygate"
done

echo "== deb: keygate --version"
version=$(/usr/bin/keygate --version) || fail "keygate --version"
echo "$version"
expected_commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
[ -n "${KEYGATE_BUILD_COMMIT:-}" ] && expected_commit=$KEYGATE_BUILD_COMMIT
crate_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ "$version" = "keygate $crate_version (commit $expected_commit)" ] ||
    fail "keygate --version printed '$version', expected 'keygate $crate_version (commit $expected_commit)'"

echo "== deb: keygate check -c /etc/keygate/gateway.toml"
/usr/bin/keygate check -c /etc/keygate/gateway.toml || fail "keygate check on the packaged config"
# As the service runs it: the keygate user, the config named by the
# unit's KEYGATE_CONFIG.
runuser -u keygate -- env KEYGATE_CONFIG=/etc/keygate/gateway.toml /usr/bin/keygate check ||
    fail "keygate check as the keygate user, through KEYGATE_CONFIG"

if command -v systemd-analyze >/dev/null; then
    echo "== deb: systemd-analyze verify keygate.service"
    # Offline: parses the unit, checks every directive and that ExecStart's
    # binary is there; needs no running systemd. Its output is empty when
    # the unit is clean, so any line is a failure.
    verify=$(systemd-analyze verify /lib/systemd/system/keygate.service 2>&1) ||
        fail "systemd-analyze verify: $verify"
    [ -z "$verify" ] || fail "systemd-analyze verify: $verify"
    # The sandbox, scored offline (0 = fully sandboxed, 10 = none); 1.5 when
    # written. Over 2.0 means a hardening line was lost: fail.
    echo "== deb: systemd-analyze security keygate.service"
    security=$(systemd-analyze security --offline=yes --threshold=20 /lib/systemd/system/keygate.service 2>&1) ||
        fail "systemd-analyze security: exposure above 2.0: $(echo "$security" | grep -E '✗|Overall')"
    echo "$security" | grep Overall
else
    echo "== deb: systemd-analyze not installed; the unit was not verified" >&2
fi

if [ "${KEEP:-}" = 1 ]; then
    echo "== deb: OK (left installed: KEEP=1)"
    exit 0
fi
echo "== deb: dpkg --purge keygate"
dpkg --purge keygate || fail "dpkg --purge"
[ ! -e /usr/bin/keygate ] || fail "/usr/bin/keygate left after purge"
[ ! -e /var/lib/keygate ] || fail "/var/lib/keygate left after purge"
echo "== deb: OK"
