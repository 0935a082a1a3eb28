-- The identity the key belonged to when the Check saw it (NULL: none, or no known key). No
-- foreign key: the log outlives identities, as it outlives keys. Added to the partitioned parent,
-- so every partition has it (a new column without a default rewrites nothing).
ALTER TABLE api_requests_log ADD COLUMN identity_id BIGINT;
-- For an identity's requests by day (GetIdentityUsage, `tollgate usage --identity`), as
-- api_requests_log_key_ts is for a key's. Partial: rows of keys without an identity, and
-- denials without a key, cost the batch insert nothing here.
CREATE INDEX api_requests_log_identity_ts ON api_requests_log (identity_id, ts)
    WHERE identity_id IS NOT NULL;
