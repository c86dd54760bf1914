-- The OpenResty peer's per-request work (proxy-openresty.conf), a lower bound
-- for what Kong's key-auth and rate-limiting (policy "local") plugins do on
-- each request:
--   load():   at start (init_by_lua, in the master), every issued key -> its
--             client id into the `keys` shared dict. The key is stored in
--             clear, as Kong's key-auth credential cache is keyed (keygate
--             keeps a hash; the lookup costs the same here: one shm get).
--   access(): read the key header, look it up (401 unknown or missing), a
--             per-key per-second counter in the `rate` dict (429 over LIMIT),
--             a per-key usage counter in the `usage` dict, clear the key
--             header, set X-Consumer-ID for the upstream.
-- Kong and APISIX add their router, plugin iterator and PDK on top of this.
local M = {}

-- The keys' limit, as keygate's in the bench (--rate 1000000000/s): never hit.
local LIMIT = 1000000000

local ngx = ngx
local keys = ngx.shared.keys
local rate = ngx.shared.rate
local usage = ngx.shared.usage
local clear_header = ngx.req.clear_header
local set_header = ngx.req.set_header
local now = ngx.time

-- load PATH: one key a line (the script writes the file; line N is client bench-NNNN).
function M.load(path)
    local n = 0
    for line in io.lines(path) do
        if #line > 0 then
            n = n + 1
            local ok, err = keys:set(line, string.format("bench-%04d", n))
            if not ok then error("keys dict: " .. tostring(err)) end
        end
    end
    if n == 0 then error("no keys in " .. path) end
end

local function deny(status, code, message)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    if status == 401 then ngx.header["WWW-Authenticate"] = 'ApiKey header="x-api-key"' end
    ngx.say('{"error":"', code, '","message":"', message, '"}')
    return ngx.exit(status)
end

function M.access()
    local key = ngx.var.http_x_api_key
    if not key then return deny(401, "missing_key", "no API key") end
    local client = keys:get(key)
    if not client then return deny(401, "invalid_key", "unknown API key") end

    -- Per-key fixed window of one second, as Kong's local policy counts.
    local count, err = rate:incr(client .. ":" .. now(), 1, 0, 2)
    if not count then
        ngx.log(ngx.ERR, "rate dict: ", err)
    elseif count > LIMIT then
        ngx.header["Retry-After"] = "1"
        return deny(429, "rate_limited", "rate limit exceeded")
    end

    usage:incr(client, 1, 0)

    clear_header("x-api-key")
    set_header("X-Consumer-ID", client)
end


return M
