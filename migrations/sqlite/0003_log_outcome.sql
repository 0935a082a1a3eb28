-- What the upstream answered, from Envoy's access log service, joined by request id.
ALTER TABLE api_requests_log ADD COLUMN response_status INTEGER;
ALTER TABLE api_requests_log ADD COLUMN duration_ms INTEGER;
ALTER TABLE api_requests_log ADD COLUMN bytes_received INTEGER;
ALTER TABLE api_requests_log ADD COLUMN bytes_sent INTEGER;
CREATE INDEX api_requests_log_request_id ON api_requests_log (request_id);
