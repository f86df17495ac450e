-- wrk script for bench/run: requests cycle over M0001-USD .. M<N>-USD (the markets bench/run
-- seeds), N from the first script argument (`wrk ... -s wrk_markets.lua URL -- 1000`). The
-- request strings are built once in init, so the per-request cost in wrk is a table index.
-- Prints the same summary line as wrk_report.lua.
local reqs, n, i = {}, 0, 0

function init(args)
  n = tonumber(args[1] or "1000")
  for k = 1, n do
    reqs[k] = wrk.format("GET", string.format("/api/markets/price?market=M%04d-USD", k))
  end
  i = math.random(n) - 1
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d errors=%d non2xx=%d p50_us=%d p99_us=%d p999_us=%d max_us=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
