-- wrk script: POST one prepared KServe v2 inference body over and over.
-- usage: wrk -s infer.lua URL -- BODY_FILE HEADER_LENGTH
--   HEADER_LENGTH: the JSON header's byte length of a binary-tensor body (sent as
--   Inference-Header-Content-Length), or 0 for a plain JSON body.
-- It prints one line "WRK_JSON {...}" that bench/wrk.py parses. Answers with status >= 400
-- are wrk's errors.status; no response() callback is defined, because one makes wrk hand
-- every response to Lua and slows the client down. Latencies are in microseconds.

function init(args)
  if #args < 2 then
    error("infer.lua needs two script arguments: BODY_FILE HEADER_LENGTH")
  end
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*all")
  f:close()
  wrk.method = "POST"
  if tonumber(args[2]) > 0 then
    wrk.headers["Content-Type"] = "application/octet-stream"
    wrk.headers["Inference-Header-Content-Length"] = args[2]
  else
    wrk.headers["Content-Type"] = "application/json"
  end
end

function done(summary, latency, requests)
  io.write(string.format("WRK_JSON {\"requests\": %d, \"duration_us\": %d, \"bytes\": %d, " ..
    "\"errors_connect\": %d, \"errors_read\": %d, \"errors_write\": %d, " ..
    "\"errors_timeout\": %d, \"errors_status\": %d, \"mean_us\": %.1f, " ..
    "\"p50_us\": %d, \"p90_us\": %d, \"p99_us\": %d, \"max_us\": %d}\n",
    summary.requests, summary.duration, summary.bytes, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout, summary.errors.status,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
end
