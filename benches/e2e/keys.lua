-- GET with the API key taken round robin from a file of keys (one per line):
--   wrk ... -s keys.lua URL -- KEYFILE
-- Requests are formatted once in init, so the client does the same little
-- work per request as in the single-key runs.
local requests = {}
local i = 0

function init(args)
   for line in io.lines(args[1]) do
      if #line > 0 then
         requests[#requests + 1] = wrk.format("GET", nil, { ["x-api-key"] = line })
      end
   end
   assert(#requests > 0, "no keys in " .. tostring(args[1]))
end

function request()
   i = i % #requests + 1
   return requests[i]
end
