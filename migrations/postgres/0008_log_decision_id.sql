-- The id tollgate mints for each Check and hands to Envoy in the answer's dynamic metadata.
-- Envoy's access log carries it back, and it alone says which row an entry completes (and
-- refunds): request_id is the client's own x-request-id, kept for correlation only.
ALTER TABLE api_requests_log ADD COLUMN decision_id TEXT;
-- A unique index on a partitioned table must hold the partition key (ts), which would not make
-- the id unique; the id is unique by construction (80 random bits), and a row is completed at
-- most once (response_status IS NULL).
CREATE INDEX api_requests_log_decision_id ON api_requests_log (decision_id)
    WHERE decision_id IS NOT NULL;
