-- wrk script: POST the body in $BENCH_BODY to $BENCH_PATH; optional Inference-Header-Content-Length.
-- Prints one JSON line at the end (requests, duration, p50/p99 in µs, errors).
wrk.method = "POST"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.path = os.getenv("BENCH_PATH")
wrk.headers["Content-Type"] = os.getenv("BENCH_CTYPE") or "application/json"
local hcl = os.getenv("BENCH_HCL")
if hcl and hcl ~= "" then wrk.headers["Inference-Header-Content-Length"] = hcl end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
