-- Every key has its usage row from the moment it exists, whoever inserts it (tollgate, or SQL by
-- hand), so the quota statement never meets a key without one. The counters start at zero, so
-- the day and month they are dated with do not matter.
CREATE FUNCTION tollgate_create_usage_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO api_usage (api_key_id, day, month)
    VALUES (NEW.id, (now() AT TIME ZONE 'UTC')::date,
            date_trunc('month', now() AT TIME ZONE 'UTC')::date)
    ON CONFLICT (api_key_id) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_usage_row AFTER INSERT ON api_keys
    FOR EACH ROW EXECUTE FUNCTION tollgate_create_usage_row();

-- Keys an earlier version left without one.
INSERT INTO api_usage (api_key_id, day, month)
SELECT id, (now() AT TIME ZONE 'UTC')::date, date_trunc('month', now() AT TIME ZONE 'UTC')::date
FROM api_keys
ON CONFLICT (api_key_id) DO NOTHING;
