-- Rotation with a grace period: the secret a key had before its last rotation keeps working
-- until old_key_expires_at (its hash and visible prefix are kept; never the secret itself).
ALTER TABLE api_keys ADD COLUMN old_key_hash TEXT;
ALTER TABLE api_keys ADD COLUMN old_prefix TEXT;
ALTER TABLE api_keys ADD COLUMN old_key_expires_at TIMESTAMPTZ;
-- The lookup of a secret that is not a key's current one: WHERE old_key_hash = $1.
CREATE UNIQUE INDEX api_keys_old_key_hash ON api_keys (old_key_hash) WHERE old_key_hash IS NOT NULL;
-- The permissions a key has, as a JSON array of names; NULL: it may call every route.
ALTER TABLE api_keys ADD COLUMN permissions TEXT;
-- What the key carries to Envoy and the upstream: a JSON object of string values; NULL: nothing.
ALTER TABLE api_keys ADD COLUMN metadata TEXT;
-- Which secret a request presented (its visible prefix): tells the old secret from the new one
-- while a rotation's grace runs.
ALTER TABLE api_requests_log ADD COLUMN key_prefix TEXT;

-- A change now also names the secret a rotation retired, and the one it retires for good, so
-- every replica drops both from its cache.
CREATE OR REPLACE FUNCTION tollgate_notify_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tollgate_key_changes', OLD.key_hash);
        IF OLD.old_key_hash IS NOT NULL THEN
            PERFORM pg_notify('tollgate_key_changes', OLD.old_key_hash);
        END IF;
    ELSE
        PERFORM pg_notify('tollgate_key_changes', NEW.key_hash);
        IF NEW.old_key_hash IS NOT NULL THEN
            PERFORM pg_notify('tollgate_key_changes', NEW.old_key_hash);
        END IF;
        IF TG_OP = 'UPDATE' AND OLD.key_hash <> NEW.key_hash THEN
            PERFORM pg_notify('tollgate_key_changes', OLD.key_hash);
        END IF;
        IF TG_OP = 'UPDATE' AND OLD.old_key_hash IS DISTINCT FROM NEW.old_key_hash
           AND OLD.old_key_hash IS NOT NULL THEN
            PERFORM pg_notify('tollgate_key_changes', OLD.old_key_hash);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
