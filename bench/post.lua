-- wrk script for the overhead benchmark: POST a small non-streaming chat completion and,
-- when done, print one machine-readable line (latencies in microseconds) for bench/overhead.py.
-- Usage: wrk -t1 -c64 -d10s -s bench/post.lua http://127.0.0.1:PORT/v1/chat/completions
-- BENCH_API_KEY sets the bearer token (default sk-bench).

wrk.method = "POST"
wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"Say ok."}],"max_tokens":8}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_API_KEY") or "sk-bench")

done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%.1f,"p90":%.1f,"p99":%.1f,"max":%.1f,"mean":%.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
