-- Every key has its usage row from the moment it exists, whoever inserts it (tollgate, or SQL by
-- hand), so the quota statement never meets a key without one. The counters start at zero and
-- belong to no day yet: dated 1970, so the first request's day, whatever a replica's clock says,
-- is later.
CREATE TRIGGER api_keys_usage_row AFTER INSERT ON api_keys
BEGIN
    INSERT OR IGNORE INTO api_usage (api_key_id, day, month, updated_at)
    VALUES (NEW.id, '1970-01-01', '1970-01', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
END;

-- Keys an earlier version left without one.
INSERT OR IGNORE INTO api_usage (api_key_id, day, month, updated_at)
SELECT id, '1970-01-01', '1970-01', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
FROM api_keys;
