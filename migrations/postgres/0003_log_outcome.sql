-- What the upstream answered, from Envoy's access log service, joined by request id.
ALTER TABLE api_requests_log
    ADD COLUMN response_status SMALLINT,
    ADD COLUMN duration_ms BIGINT,
    ADD COLUMN bytes_received BIGINT,
    ADD COLUMN bytes_sent BIGINT;
-- Completing a row finds it by request id.
CREATE INDEX api_requests_log_request_id ON api_requests_log (request_id);
