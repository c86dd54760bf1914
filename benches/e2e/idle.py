#!/usr/bin/env python3
"""Idle keep-alive connections: how much resident memory each costs a proxy.

Opens COUNT connections to 127.0.0.1:PORT, sends one keep-alive GET on each
(with the API key, so keygate does its full work once per connection), reads
the answer, and keeps them all open. Prints the proxy's VmRSS before and
after, and the difference per connection. Bounded: COUNT connections, one
request each, a 60 s overall deadline.

    python3 benches/e2e/idle.py --port 18083 --pid $(pgrep -f 'keygate serve') --count 10000 --key KEY

With --cafile CA.pem the connections speak TLS (verified against CA.pem, SNI
localhost), so the difference is what one idle TLS connection costs.
"""
import argparse
import asyncio
import ssl
import sys


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def open_one(port: int, key: str, held: list, tls) -> bool:
    try:
        if tls is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="localhost")
        writer.write(f"GET / HTTP/1.1\r\nHost: bench\r\nx-api-key: {key}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if length:
            await reader.readexactly(length)
        held.append(writer)
        return head.startswith(b"HTTP/1.1 200")
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        return False


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--key", default="")
    parser.add_argument("--cafile", help="speak TLS, trusting this CA")
    args = parser.parse_args()
    tls = ssl.create_default_context(cafile=args.cafile) if args.cafile else None

    before = rss_kib(args.pid)
    held: list = []
    ok = 0
    for start in range(0, args.count, 500):
        batch = [open_one(args.port, args.key, held, tls) for _ in range(min(500, args.count - start))]
        ok += sum(await asyncio.wait_for(asyncio.gather(*batch), timeout=60))
    await asyncio.sleep(1)  # let the proxy settle its buffers before reading RSS
    after = rss_kib(args.pid)
    per = (after - before) * 1024 / max(ok, 1)
    print(f"connections held: {ok}/{args.count}; RSS {before} KiB -> {after} KiB; {per / 1024:.1f} KiB per idle connection")
    for writer in held:
        writer.close()
    return 0 if ok == args.count else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
