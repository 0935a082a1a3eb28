-- wrk -s: one line when wrk is done, for scripts/bench (read by examples/bench_report):
-- BENCH requests req/s p50_ms p99_ms p99.9_ms errors (connect, read, write, timeout, non-2xx/3xx)
done = function(summary, latency, requests)
  io.write(string.format("BENCH %d %.3f %.3f %.3f %.3f %d\n", summary.requests,
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
