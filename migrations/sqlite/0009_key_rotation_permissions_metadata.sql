-- Rotation with a grace period: the secret a key had before its last rotation keeps working
-- until old_key_expires_at (its hash and visible prefix are kept; never the secret itself).
ALTER TABLE api_keys ADD COLUMN old_key_hash TEXT;
ALTER TABLE api_keys ADD COLUMN old_prefix TEXT;
ALTER TABLE api_keys ADD COLUMN old_key_expires_at TEXT;
CREATE UNIQUE INDEX api_keys_old_key_hash ON api_keys (old_key_hash) WHERE old_key_hash IS NOT NULL;
-- The permissions a key has, as a JSON array of names; NULL: it may call every route.
ALTER TABLE api_keys ADD COLUMN permissions TEXT;
-- What the key carries to Envoy and the upstream: a JSON object of string values; NULL: nothing.
ALTER TABLE api_keys ADD COLUMN metadata TEXT;
-- Which secret a request presented (its visible prefix).
ALTER TABLE api_requests_log ADD COLUMN key_prefix TEXT;
-- The secret a second rotation retired for good (the old one of the first), kept so the change
-- poll, which reports every hash of a changed row, tells running servers to drop it too.
ALTER TABLE api_keys ADD COLUMN retired_key_hash TEXT;
