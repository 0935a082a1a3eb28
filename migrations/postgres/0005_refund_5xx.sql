-- Per key: give back the quota of requests the upstream answered with 5xx.
ALTER TABLE api_keys ADD COLUMN refund_5xx BOOLEAN NOT NULL DEFAULT false;
-- A row whose quota was given back (usage = allowed rows - refunded rows).
ALTER TABLE api_requests_log ADD COLUMN refunded BOOLEAN NOT NULL DEFAULT false;
-- What an allowed request spent (denied rows spent nothing).
ALTER TABLE api_requests_log ADD COLUMN cost BIGINT NOT NULL DEFAULT 0;
