-- The token-exchange case of benches/load/run: 1,000 distinct callers in turn, each request with its caller's own
-- bearer token, to the route that exchanges it (/exchange/). The requests are made once per thread, up front, so
-- that wrk spends no more per request than with a static one.
local requests = {}
local n = 0

init = function(args)
    for i = 0, 999 do
        local token = string.format("caller-%04d-eyJhbGciOiJSUzI1NiJ9.c2lnbmF0dXJlLW9mLXRoZS1jYWxsZXI", i)
        requests[i + 1] = wrk.format("GET", "/exchange/", { ["Authorization"] = "Bearer " .. token })
    end
end

request = function()
    n = n % 1000 + 1
    return requests[n]
end
