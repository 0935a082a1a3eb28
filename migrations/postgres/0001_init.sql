-- tollgate schema, PostgreSQL dialect (shared by every replica).

CREATE TABLE api_keys (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT        NOT NULL,
    prefix        TEXT        NOT NULL,
    key_hash      TEXT        NOT NULL,   -- hex SHA-256 of the key; the key itself is never stored
    status        TEXT        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    expires_at    TIMESTAMPTZ,
    per_minute    BIGINT      CHECK (per_minute IS NULL OR per_minute > 0),
    daily_limit   BIGINT      CHECK (daily_limit IS NULL OR daily_limit > 0),
    monthly_limit BIGINT      CHECK (monthly_limit IS NULL OR monthly_limit > 0),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- The lookup every check makes (on a cache miss): WHERE key_hash = $1.
CREATE UNIQUE INDEX api_keys_key_hash ON api_keys (key_hash);

CREATE TABLE api_usage (
    -- One row per key; the quota UPDATE finds it by primary key and its row lock serialises
    -- concurrent checks of one key.
    api_key_id       BIGINT      PRIMARY KEY REFERENCES api_keys (id) ON DELETE CASCADE,
    day              DATE        NOT NULL,   -- UTC day the daily counter belongs to
    month            DATE        NOT NULL,   -- first day of the UTC month the monthly counter belongs to
    daily_requests   BIGINT      NOT NULL DEFAULT 0,
    monthly_requests BIGINT      NOT NULL DEFAULT 0,
    total_requests   BIGINT      NOT NULL DEFAULT 0,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE api_requests_log (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts          TIMESTAMPTZ NOT NULL,
    request_id  TEXT,
    api_key_id  BIGINT,
    method      TEXT,
    path        TEXT,
    host        TEXT,
    client_addr TEXT,
    decision    TEXT        NOT NULL CHECK (decision IN ('allow', 'deny')),
    reason      TEXT        NOT NULL,
    status      SMALLINT    NOT NULL
);
-- Per-key history (tollgate usage, audits): WHERE api_key_id = $1 AND ts >= $2.
CREATE INDEX api_requests_log_key_ts ON api_requests_log (api_key_id, ts);

-- Every change to a key, by tollgate or by hand, tells running replicas which cached key to
-- drop. NOTIFY is delivered on commit, so a replica never re-reads a change before it is visible.
CREATE FUNCTION tollgate_notify_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tollgate_key_changes', OLD.key_hash);
    ELSE
        PERFORM pg_notify('tollgate_key_changes', NEW.key_hash);
        IF TG_OP = 'UPDATE' AND OLD.key_hash <> NEW.key_hash THEN
            PERFORM pg_notify('tollgate_key_changes', OLD.key_hash);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_notify_change
    AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_key_change();
