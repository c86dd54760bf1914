-- POST with a 16 KiB body; the key header comes from `wrk -H`.
wrk.method = "POST"
wrk.body = string.rep("x", 16384)
wrk.headers["Content-Type"] = "application/octet-stream"
