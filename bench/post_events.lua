-- wrk script: POST pre-signed Coherent events, each one once, and report figures as one JSON line.
-- Usage: wrk -t2 -c16 -d10s -s bench/post_events.lua http://127.0.0.1:PORT/webhooks -- EVENTS_FILE THREADS
-- EVENTS_FILE has one "signature<TAB>body" line per event; thread i sends lines i, i+THREADS, ...
-- so no event is sent twice. If a thread runs out it starts over, and "wrapped" says so.

local threads = {}
local next_index = 0

function setup(thread)
  thread:set("index", next_index)
  next_index = next_index + 1
  table.insert(threads, thread)
end

function init(args)
  local path, count = args[1], tonumber(args[2])
  prepared = {}
  local line_number = 0
  for line in io.lines(path) do
    if line_number % count == index then
      local tab = line:find("\t", 1, true)
      prepared[#prepared + 1] = wrk.format("POST", nil, {
        ["x-protocol-signature"] = line:sub(1, tab - 1),
        ["Content-Type"] = "application/json",
      }, line:sub(tab + 1))
    end
    line_number = line_number + 1
  end
  position, non2xx, wrapped = 0, 0, 0
end

function request()
  position = position + 1
  if position > #prepared then
    position, wrapped = 1, wrapped + 1
  end
  return prepared[position]
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local bad, wraps = 0, 0
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("non2xx")
    wraps = wraps + thread:get("wrapped")
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_ms": %.2f, "p90_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f, '
      .. '"non2xx": %d, "socket_errors": %d, "wrapped": %d}\n',
    summary.requests, summary.duration,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    bad, errors.connect + errors.read + errors.write + errors.timeout, wraps))
end
