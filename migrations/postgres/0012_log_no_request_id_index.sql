-- No statement of tollgate's reads the log by request_id (the client's own x-request-id, kept for
-- correlation only since 0008: rows are completed by decision_id), and the index cost every
-- Check's row one more B-tree insert. To find a request by its id, bound the time as well
-- (`WHERE request_id = $1 AND ts >= $2`), which prunes partitions. Dropping the partitioned
-- index drops each partition's.
DROP INDEX IF EXISTS api_requests_log_request_id;
