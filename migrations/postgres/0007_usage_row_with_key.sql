-- Every key has its usage row from the moment it exists, whoever inserts it (tollgate, or SQL by
-- hand), so the quota statement never meets a key without one. The counters start at zero and
-- belong to no day yet: dated 1970, so the first request's day, whatever a replica's clock says,
-- is later.
CREATE FUNCTION tollgate_create_usage_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO api_usage (api_key_id, day, month)
    VALUES (NEW.id, DATE '1970-01-01', DATE '1970-01-01')
    ON CONFLICT (api_key_id) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_usage_row AFTER INSERT ON api_keys
    FOR EACH ROW EXECUTE FUNCTION tollgate_create_usage_row();

-- Keys an earlier version left without one.
INSERT INTO api_usage (api_key_id, day, month)
SELECT id, DATE '1970-01-01', DATE '1970-01-01' FROM api_keys
ON CONFLICT (api_key_id) DO NOTHING;
