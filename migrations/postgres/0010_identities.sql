-- Identities: a customer whose keys share limits. A key that belongs to one must fit its own
-- limits and the identity's; a Check spends both or neither (one statement, identity row locked
-- before the key's row).
CREATE TABLE identities (
    id            BIGSERIAL   PRIMARY KEY,
    name          TEXT        NOT NULL,
    per_minute    BIGINT      CHECK (per_minute IS NULL OR per_minute > 0),
    daily_limit   BIGINT      CHECK (daily_limit IS NULL OR daily_limit > 0),
    monthly_limit BIGINT      CHECK (monthly_limit IS NULL OR monthly_limit > 0),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The identity's shared counters, shaped as api_usage (a counter from an earlier day or month
-- counts as 0).
CREATE TABLE identity_usage (
    identity_id      BIGINT      PRIMARY KEY REFERENCES identities (id) ON DELETE CASCADE,
    day              DATE        NOT NULL,
    month            DATE        NOT NULL,
    daily_requests   BIGINT      NOT NULL DEFAULT 0,
    monthly_requests BIGINT      NOT NULL DEFAULT 0,
    total_requests   BIGINT      NOT NULL DEFAULT 0,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE FUNCTION tollgate_create_identity_usage_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO identity_usage (identity_id, day, month)
    VALUES (NEW.id, DATE '1970-01-01', DATE '1970-01-01')
    ON CONFLICT (identity_id) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER identities_usage_row AFTER INSERT ON identities
    FOR EACH ROW EXECUTE FUNCTION tollgate_create_identity_usage_row();

-- The identity a key belongs to (NULL: none). Deleting an identity detaches its keys.
ALTER TABLE api_keys ADD COLUMN identity_id BIGINT REFERENCES identities (id) ON DELETE SET NULL;
CREATE INDEX api_keys_identity_id ON api_keys (identity_id) WHERE identity_id IS NOT NULL;
