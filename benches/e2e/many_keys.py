#!/usr/bin/env python3
"""Generate COUNT key records in keygate's Redis layout, for `redis-cli --pipe`.

Writes the Redis protocol to stdout and the first HOT full key strings (one
per line, for benches/e2e/keys.lua) to --hot-file. Keys are deterministic
(secrets derived from their index), built exactly as keygate builds them:
`kg_<client>_<43 base62 secret><6 base62 CRC32>`, records found by the
SHA-256 of the secret (docs/redis-schema.md). Ten keys per client.

    python3 benches/e2e/many_keys.py --count 1000000 --hot 100000 --hot-file hot.txt \\
        | redis-cli -p PORT --pipe
"""
import argparse
import hashlib
import sys
import zlib

BASE62 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def base62_fixed(value: int, width: int) -> bytes:
    out = bytearray(b"0" * width)
    for i in range(width - 1, -1, -1):
        out[i] = BASE62[value % 62]
        value //= 62
    return bytes(out)


def resp(*parts: bytes) -> bytes:
    chunks = [b"*%d\r\n" % len(parts)]
    for part in parts:
        chunks.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(chunks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--hot", type=int, default=100_000)
    parser.add_argument("--hot-file", required=True)
    parser.add_argument("--redis-prefix", default="kg:")
    parser.add_argument("--key-prefix", default="kg_")
    args = parser.parse_args()
    redis_prefix, key_prefix = args.redis_prefix.encode(), args.key_prefix.encode()

    out = sys.stdout.buffer
    with open(args.hot_file, "wb") as hot:
        for i in range(args.count):
            client = b"c%d" % (i // 10)
            kid = base62_fixed(i, 8)
            digest = hashlib.sha256(b"keygate-bench-%d" % i).digest()
            secret = base62_fixed(int.from_bytes(digest, "big"), 43)
            signed = key_prefix + client + b"_" + secret
            key = signed + base62_fixed(zlib.crc32(signed), 6)
            secret_hash = hashlib.sha256(secret).hexdigest().encode()
            tag = redis_prefix + b"{" + client + b"}"
            out.write(resp(
                b"HSET", tag + b":key:" + secret_hash,
                b"id", client + b"." + kid, b"client", client, b"secret_hash", secret_hash,
                b"scopes", b"read-write", b"status", b"active", b"created_at", b"1764000000",
                b"rate", b"1000000000/s",
            ))
            out.write(resp(b"SET", tag + b":id:" + kid, secret_hash))
            out.write(resp(b"SADD", tag + b":keys", kid))
            if i % 10 == 0:
                out.write(resp(b"SADD", redis_prefix + b"clients", client))
            if i < args.hot:
                hot.write(key + b"\n")


if __name__ == "__main__":
    main()
