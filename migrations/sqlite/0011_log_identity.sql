-- The identity the key belonged to when the Check saw it (NULL: none, or no known key). No
-- foreign key: the log outlives identities, as it outlives keys. No index: an identity's
-- requests are read by time through api_requests_log_ts, as a key's are here.
ALTER TABLE api_requests_log ADD COLUMN identity_id INTEGER;
