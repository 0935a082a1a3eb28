-- Retention deletes the oldest rows by time, and `tollgate usage` reads a time range: without
-- this index both scanned the whole log (gigabytes after a few weeks of traffic), holding the
-- single write connection while they did.
CREATE INDEX api_requests_log_ts ON api_requests_log (ts);
