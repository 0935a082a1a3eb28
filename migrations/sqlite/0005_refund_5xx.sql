-- Per key: give back the quota of requests the upstream answered with 5xx.
ALTER TABLE api_keys ADD COLUMN refund_5xx INTEGER NOT NULL DEFAULT 0 CHECK (refund_5xx IN (0, 1));
-- A row whose quota was given back (usage = allowed rows - refunded rows).
ALTER TABLE api_requests_log ADD COLUMN refunded INTEGER NOT NULL DEFAULT 0 CHECK (refunded IN (0, 1));
-- What an allowed request spent (denied rows spent nothing).
ALTER TABLE api_requests_log ADD COLUMN cost INTEGER NOT NULL DEFAULT 0;
