#!/usr/bin/env python3
"""keygate soak: one gateway under mixed traffic and faults for a bounded time.

Started by run.sh (see it, or `run.sh --help`, for the flags). Loopback only,
python3 standard library only. What it does:

- starts its own redis-server on a free port (never 6379), two upstreams
  (this file in `--upstream` mode, one process each) and the gateway;
- issues keys with the CLI (`keygate keys issue --redis URL`): two valid
  clients, one with a tight rate limit, and a revoked key;
- drives traffic: valid keys (x-api-key and Bearer) on both routes, invalid
  keys (bad checksum, well-formed but unknown, revoked, none), the
  rate-limited key well over its limit, and slow clients that send their
  request head one byte a second;
- meanwhile restarts redis-server twice (SHUTDOWN SAVE, then start again on
  the same port and data) and stops/restarts upstream B every minute;
- samples the gateway's RSS and open descriptors every 10 s;
- at the end compares the usage in Redis (`keygate usage --json`) with what
  it counted, and fails (exit 1) on: a 5xx to a valid key outside a fault
  window, an invalid key admitted, usage totals that differ, the limited key
  admitted beyond its rate, descriptors not back to their level once idle,
  or a gateway that stopped answering.
"""

import argparse
import http.client
import http.server
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
LIMITED_RATE, LIMITED_BURST = 5, 5
REDIS_DOWN_S = 5.0
UPSTREAM_DOWN_S = 4.0
# A request that ended up to this long after a fault ended still counts as
# made during the fault (pools reconnect, cached errors clear).
GRACE_S = 3.0


# === upstream mode ===


class Upstream(http.server.BaseHTTPRequestHandler):
    """A small keep-alive upstream: 200 with a short body for any request."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"ok " + self.server.name
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def run_upstream(port, name):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Upstream)
    server.daemon_threads = True
    server.name = name.encode()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()


# === helpers ===


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def wait_closed(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                time.sleep(0.05)
        except OSError:
            return True
    return False


def key_with_checksum(prefix, client, secret):
    """A well-formed key string (the format of src/key.rs), unknown to the store."""
    signed = f"{prefix}{client}_{secret}"
    crc = zlib.crc32(signed.encode())
    digits = []
    for _ in range(6):
        digits.append(BASE62[crc % 62])
        crc //= 62
    return signed + "".join(reversed(digits))


def random_secret(rng):
    return "".join(rng.choice(BASE62) for _ in range(43))


class Redis:
    """redis-server on its own port, with a data file so a restart keeps the data."""

    def __init__(self, port, workdir, log):
        self.port, self.workdir, self.log = port, workdir, log
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.workdir,
             "--dbfilename", "soak.rdb", "--save", "", "--appendonly", "no"],
            stdout=self.log, stderr=self.log)
        if not wait_port(self.port):
            raise RuntimeError("redis-server did not start")

    def restart_saved(self):
        """SHUTDOWN SAVE (the data survives, like a restart of a persistent Redis)."""
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "save"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


class UpstreamProc:
    def __init__(self, port, name, log):
        self.port, self.name, self.log, self.proc = port, name, log, None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--upstream",
                                      str(self.port), self.name], stdout=self.log, stderr=self.log)
        if not wait_port(self.port):
            raise RuntimeError(f"upstream {self.name} did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        wait_closed(self.port)


# === traffic ===


class Stats:
    """Counts shared by the traffic threads; one lock, held only to add."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_client = {}  # client -> {"responses": n, "2xx": n, "4xx": n, "5xx": n, "429": n}
        self.transport_errors = {}  # client -> n (no response read)
        self.unexpected_5xx = []  # (t, client, path, status)
        self.expected_5xx_upstream = 0
        self.expected_5xx_redis = 0
        self.invalid_admitted = 0
        self.invalid_refused = 0
        self.slow = {}  # what happened to slow clients -> n
        self.latencies = []  # valid-key request latencies, seconds (sampled)

    def count(self, client, status):
        with self.lock:
            c = self.by_client.setdefault(client, {"responses": 0, "2xx": 0, "4xx": 0, "5xx": 0, "429": 0})
            c["responses"] += 1
            c[f"{status // 100}xx"] = c.get(f"{status // 100}xx", 0) + 1
            if status == 429:
                c["429"] += 1

    def transport_error(self, client):
        with self.lock:
            self.transport_errors[client] = self.transport_errors.get(client, 0) + 1


class Faults:
    """When Redis and upstream B were intentionally down (monotonic seconds)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.redis, self.upstream_b = [], []
        self.redis_down_since = None
        self.b_down_since = None

    def during(self, windows, since, t0, t1):
        with self.lock:
            spans = list(windows) + ([(since, float("inf"))] if since is not None else [])
        return any(t0 <= end + GRACE_S and t1 >= start for start, end in spans)

    def classify(self, path, t0, t1):
        if path.startswith("/b") and self.during(self.upstream_b, self.b_down_since, t0, t1):
            return "upstream"
        if self.during(self.redis, self.redis_down_since, t0, t1):
            return "redis"
        return None


def request(conn, path, headers):
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    response.read()
    return response.status


def keyed_worker(port, stop, stats, faults, client, key, carrier, paths, pace):
    """Valid-key traffic: every response counted; a 5xx outside a fault fails the run."""
    headers = {"x-api-key": key} if carrier == "header" else {"authorization": f"Bearer {key}"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = 0
    while not stop.is_set():
        path = paths[i % len(paths)]
        i += 1
        t0 = time.monotonic()
        try:
            status = request(conn, path, headers)
        except (OSError, http.client.HTTPException):
            stats.transport_error(client)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            time.sleep(0.05)
            continue
        t1 = time.monotonic()
        stats.count(client, status)
        if status >= 500:
            cause = faults.classify(path, t0, t1)
            with stats.lock:
                if cause == "upstream":
                    stats.expected_5xx_upstream += 1
                elif cause == "redis":
                    stats.expected_5xx_redis += 1
                else:
                    stats.unexpected_5xx.append((round(t1, 1), client, path, status))
        elif i % 20 == 0:
            with stats.lock:
                stats.latencies.append(t1 - t0)
        if pace:
            time.sleep(pace)
    conn.close()


def invalid_worker(port, stop, stats, keys_prefix, revoked_key, pace):
    """Keys that must never be admitted: bad checksum, unknown, revoked, none."""
    rng = random.Random(7)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = 0
    while not stop.is_set():
        i += 1
        kind = i % 5
        if kind == 0:
            headers = {"x-api-key": key_with_checksum(keys_prefix, "soak-v1", random_secret(rng))}
        elif kind == 1:
            headers = {"x-api-key": key_with_checksum(keys_prefix, "soak-v1", random_secret(rng))[:-1] + "0"}
        elif kind == 2:
            headers = {"authorization": f"Bearer {revoked_key}"}
        elif kind == 3:
            headers = {}
        else:
            headers = {"authorization": f"Bearer {key_with_checksum(keys_prefix, 'nobody', random_secret(rng))}"}
        try:
            status = request(conn, "/a/x", headers)
        except (OSError, http.client.HTTPException):
            stats.transport_error("_invalid")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            time.sleep(0.05)
            continue
        with stats.lock:
            if 200 <= status < 400:
                stats.invalid_admitted += 1
            else:
                stats.invalid_refused += 1
        time.sleep(pace)
    conn.close()


def slow_worker(port, stop, stats, sockets):
    """Clients that send their request head one byte a second, `sockets` at a time.

    Counted: heads completed and answered (by status), answers or closes by
    the gateway before the head was complete (a header-read deadline)."""
    head = b"GET /a/slow HTTP/1.1\r\nHost: soak\r\nUser-Agent: slow\r\n\r\n"
    conns = []  # [socket, bytes sent]

    def note(what):
        with stats.lock:
            stats.slow[what] = stats.slow.get(what, 0) + 1

    while not stop.is_set():
        while len(conns) < sockets:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                note("connect_failed")
                break
            s.setblocking(False)
            conns.append([s, 0])
        for c in list(conns):
            s, sent = c
            try:
                data = s.recv(4096)
                done = sent >= len(head)
                if data.startswith(b"HTTP/"):
                    status = data.split(b" ", 2)[1].decode(errors="replace")
                    note(f"answered_{status}" if done else f"early_{status}")
                else:
                    note("closed_after_head" if done else "closed_before_head")
                s.close()
                conns.remove(c)
                continue
            except BlockingIOError:
                pass
            except OSError:
                note("reset")
                s.close()
                conns.remove(c)
                continue
            if sent < len(head):
                try:
                    s.send(head[sent:sent + 1])
                    c[1] += 1
                except OSError:
                    note("reset")
                    s.close()
                    conns.remove(c)
        stop.wait(1.0)
    for s, _ in conns:
        s.close()


# === the run ===


def sample(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds
    except (OSError, StopIteration):
        return None, None


def usage_report(keygate, config, redis_url):
    out = subprocess.run([keygate, "usage", "-c", config, "--redis", redis_url, "--since", "6h", "--by", "hour", "--json"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"keygate usage failed: {out.stderr.strip()}")
    report = json.loads(out.stdout)
    return {c["client"]: c["totals"] for c in report["clients"]}


def issue(keygate, config, redis_url, client, *flags):
    out = subprocess.run([keygate, "keys", "issue", "-c", config, "--redis", redis_url, "--client", client, *flags],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"keys issue failed: {out.stderr.strip()}")
    return out.stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keygate", help="the keygate binary (required)")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    ap.add_argument("--slow", type=int, default=20, help="slow client sockets open at once (default 20)")
    ap.add_argument("--workdir", default=None, help="where logs and data go (default: a new temp dir)")
    ap.add_argument("--upstream", nargs=2, metavar=("PORT", "NAME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.upstream:
        run_upstream(int(args.upstream[0]), args.upstream[1])
        return 0
    if not args.keygate:
        ap.error("--keygate is required")

    duration = args.duration
    workdir = args.workdir or tempfile.mkdtemp(prefix="keygate-soak-")
    os.makedirs(workdir, exist_ok=True)
    log = open(os.path.join(workdir, "services.log"), "ab")
    print(f"soak: {duration:.0f} s, logs in {workdir}", flush=True)

    redis_port, gw_port, a_port, b_port = free_port(), free_port(), free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}"
    redis = Redis(redis_port, workdir, log)
    up_a, up_b = UpstreamProc(a_port, "a", log), UpstreamProc(b_port, "b", log)
    gateway = None
    stop = threading.Event()
    threads = []
    try:
        redis.start()
        up_a.start()
        up_b.start()
        config = os.path.join(workdir, "gateway.toml")
        with open(config, "w") as f:
            f.write(f"""# Written by benches/soak/soak.py.
[server]
listen = "127.0.0.1:{gw_port}"
drain_timeout = "2s"

[store]
kind = "redis"
url = "{redis_url}"

[usage]
flush_interval = "1s"

[log]
filter = "warn"
access = "off"

[[route]]
path = "/a"
upstream = "a"

[[route]]
path = "/b"
upstream = "b"

[upstream.a]
targets = ["http://127.0.0.1:{a_port}"]
connect_timeout = "1s"
timeout = "10s"

[upstream.b]
targets = ["http://127.0.0.1:{b_port}"]
connect_timeout = "1s"
timeout = "10s"
""")
        v1 = issue(args.keygate, config, redis_url, "soak-v1", "--scopes", "read-write")
        v2 = issue(args.keygate, config, redis_url, "soak-v2", "--scopes", "read")
        limited = issue(args.keygate, config, redis_url, "soak-limited", "--scopes", "read",
                        "--rate", f"{LIMITED_RATE}/s", "--burst", str(LIMITED_BURST))
        revoked = issue(args.keygate, config, redis_url, "soak-revoked", "--scopes", "read")
        subprocess.run([args.keygate, "keys", "revoke", "-c", config, "--redis", redis_url, "-"], input=revoked, text=True,
                       capture_output=True, check=True, timeout=60)

        gateway = subprocess.Popen([args.keygate, "serve", "-c", config],
                                   stdout=open(os.path.join(workdir, "gateway.log"), "ab"), stderr=subprocess.STDOUT)
        if not wait_port(gw_port):
            raise RuntimeError("the gateway did not start; see gateway.log")

        stats, faults = Stats(), Faults()
        start = time.monotonic()
        workers = [
            (keyed_worker, (gw_port, stop, stats, faults, "soak-v1", v1, "header", ["/a/x", "/b/x"], 0.002)),
            (keyed_worker, (gw_port, stop, stats, faults, "soak-v1", v1, "bearer", ["/b/y", "/a/y"], 0.002)),
            (keyed_worker, (gw_port, stop, stats, faults, "soak-v2", v2, "bearer", ["/a/z", "/b/z"], 0.002)),
            (keyed_worker, (gw_port, stop, stats, faults, "soak-limited", limited, "header", ["/a/l"], 0.02)),
            (invalid_worker, (gw_port, stop, stats, "kg_", revoked, 0.005)),
            (slow_worker, (gw_port, stop, stats, args.slow)),
        ]
        for target, targs in workers:
            t = threading.Thread(target=target, args=targs, daemon=True)
            t.start()
            threads.append(t)

        # Fault plan: Redis restarted at 30 % and 65 %, upstream B down every
        # minute (every sixth of a shorter run).
        plan = [(duration * 0.30, "redis"), (duration * 0.65, "redis")]
        flap_every = min(60.0, duration / 6)
        t = flap_every / 2
        while t < duration - UPSTREAM_DOWN_S - GRACE_S:
            plan.append((t, "flap"))
            t += flap_every
        plan.sort()
        samples = []
        next_sample = 0.0
        events = []

        def fault(kind):
            now = time.monotonic()
            if kind == "redis":
                with faults.lock:
                    faults.redis_down_since = now
                redis.restart_saved()
                time.sleep(REDIS_DOWN_S)
                redis.start()
                with faults.lock:
                    faults.redis.append((faults.redis_down_since, time.monotonic()))
                    faults.redis_down_since = None
            else:
                with faults.lock:
                    faults.b_down_since = now
                up_b.stop()
                time.sleep(UPSTREAM_DOWN_S)
                up_b.start()
                with faults.lock:
                    faults.upstream_b.append((faults.b_down_since, time.monotonic()))
                    faults.b_down_since = None
            events.append((round(now - start), kind))

        fault_threads = []
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= duration:
                break
            if gateway.poll() is not None:
                raise RuntimeError(f"the gateway exited ({gateway.returncode}); see gateway.log")
            if elapsed >= next_sample:
                rss, fds = sample(gateway.pid)
                with stats.lock:
                    done = sum(c["responses"] for c in stats.by_client.values())
                samples.append((round(elapsed), rss, fds, done))
                print(f"  t={elapsed:5.0f}s rss={rss} KiB fds={fds} responses={done}", flush=True)
                next_sample += 10.0
            while plan and plan[0][0] <= elapsed:
                _, kind = plan.pop(0)
                if kind == "redis" and faults.redis_down_since is not None:
                    continue
                ft = threading.Thread(target=fault, args=(kind,), daemon=True)
                ft.start()
                fault_threads.append(ft)
            time.sleep(0.2)
        elapsed = time.monotonic() - start
        stop.set()
        for t in threads + fault_threads:
            t.join(timeout=40)

        # Idle: traffic stopped, every client socket closed.
        time.sleep(3)
        idle_rss, idle_fds = sample(gateway.pid)
        conn = http.client.HTTPConnection("127.0.0.1", gw_port, timeout=10)
        try:
            final_status = request(conn, "/a/final", {"x-api-key": v1})
            stats.count("soak-v1", final_status)
        except (OSError, http.client.HTTPException) as e:
            final_status = f"error: {e}"
        conn.close()

        # Usage: flushed every second; wait until it settles (bounded).
        keyed = ["soak-v1", "soak-v2", "soak-limited"]
        want = {c: stats.by_client.get(c, {}).get("responses", 0) for c in keyed}
        usage, last = {}, None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            usage = usage_report(args.keygate, config, redis_url)
            got = {c: usage.get(c, {}).get("requests", 0) for c in keyed}
            if got == want or got == last:
                break
            last = got
            time.sleep(3)

        # === report ===
        failed = []
        print()
        print(f"soak finished: {elapsed:.0f} s of traffic; faults at (s): {events}")
        print()
        print("  t(s)   RSS(KiB)   fds   responses")
        for t_s, rss, fds, done in samples:
            print(f"  {t_s:4}   {rss!s:>8}   {fds!s:>3}   {done:>9}")
        print(f"  idle   {idle_rss!s:>8}   {idle_fds!s:>3}   (3 s after traffic stopped)")
        print()
        print(f"  {'client':14} {'responses':>9} {'2xx':>8} {'4xx':>6} {'429':>6} {'5xx':>5} {'no-resp':>7}"
              f" | {'usage.requests':>14} {'usage.2xx':>9}")
        for c in keyed:
            s = stats.by_client.get(c, {})
            u = usage.get(c, {})
            lost = stats.transport_errors.get(c, 0)
            print(f"  {c:14} {s.get('responses', 0):>9} {s.get('2xx', 0):>8} {s.get('4xx', 0):>6}"
                  f" {s.get('429', 0):>6} {s.get('5xx', 0):>5} {lost:>7} | {u.get('requests', 0):>14}"
                  f" {u.get('status_2xx', 0):>9}")
            # A request whose answer was lost on the way may or may not have been counted.
            if not (s.get("responses", 0) <= u.get("requests", 0) <= s.get("responses", 0) + lost):
                failed.append(f"{c}: usage.requests {u.get('requests', 0)} != {s.get('responses', 0)} answered")
            if not (s.get("2xx", 0) <= u.get("status_2xx", 0) <= s.get("2xx", 0) + lost):
                failed.append(f"{c}: usage.status_2xx {u.get('status_2xx', 0)} != {s.get('2xx', 0)} admitted")
        anon = usage.get("_anonymous", {})
        print(f"  {'_anonymous':14} (invalid keys: {stats.invalid_refused} refused, {stats.invalid_admitted} admitted;"
              f" usage.requests {anon.get('requests', 0)}, incl. slow clients)")
        print()
        lat = sorted(stats.latencies)
        if lat:
            print(f"  valid-key latency (1 in 20 sampled): p50 {lat[len(lat) // 2] * 1000:.1f} ms,"
                  f" p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")
        print(f"  5xx to valid keys: {len(stats.unexpected_5xx)} unexpected,"
              f" {stats.expected_5xx_upstream} while upstream B was down, {stats.expected_5xx_redis} while Redis was down")
        print(f"  transport errors (no response): {stats.transport_errors}")
        print(f"  slow clients: {stats.slow}")
        print(f"  final request after the soak: {final_status}")

        if stats.unexpected_5xx:
            failed.append(f"{len(stats.unexpected_5xx)} 5xx outside fault windows, first: {stats.unexpected_5xx[:5]}")
        if stats.invalid_admitted:
            failed.append(f"{stats.invalid_admitted} requests with invalid keys admitted")
        lim = stats.by_client.get("soak-limited", {}).get("2xx", 0)
        allowed = LIMITED_BURST + LIMITED_RATE * (elapsed + 1) + 1
        print(f"  rate-limited key: {lim} admitted, at most {allowed:.0f} allowed ({LIMITED_RATE}/s, burst {LIMITED_BURST})")
        if lim > allowed:
            failed.append(f"soak-limited admitted {lim} > {allowed:.0f}")
        first_fds = samples[1][2] if len(samples) > 1 else samples[0][2]
        if idle_fds is None or idle_fds > first_fds + 16:
            failed.append(f"descriptors once idle {idle_fds} > {first_fds} + 16 (at t=10 s)")
        if final_status != 200:
            failed.append(f"the gateway did not answer 200 after the soak: {final_status}")
        if gateway.poll() is not None:
            failed.append(f"the gateway exited ({gateway.returncode})")
        print()
        if failed:
            print("FAILED:")
            for f in failed:
                print(f"  - {f}")
            return 1
        print("PASSED: every check held")
        return 0
    finally:
        stop.set()
        if gateway and gateway.poll() is None:
            gateway.terminate()
            try:
                gateway.wait(timeout=15)
            except subprocess.TimeoutExpired:
                gateway.kill()
        up_a.stop()
        up_b.stop()
        redis.stop()


if __name__ == "__main__":
    sys.exit(main())
