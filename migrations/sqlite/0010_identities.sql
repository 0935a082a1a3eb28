-- Identities: a customer whose keys share limits. A key that belongs to one must fit its own
-- limits and the identity's; a Check spends both or neither, in one transaction.
CREATE TABLE identities (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL,
    per_minute    INTEGER CHECK (per_minute IS NULL OR per_minute > 0),
    daily_limit   INTEGER CHECK (daily_limit IS NULL OR daily_limit > 0),
    monthly_limit INTEGER CHECK (monthly_limit IS NULL OR monthly_limit > 0),
    created_at    TEXT    NOT NULL,
    updated_at    TEXT    NOT NULL
);

-- The identity's shared counters, shaped as api_usage.
CREATE TABLE identity_usage (
    identity_id      INTEGER PRIMARY KEY REFERENCES identities (id) ON DELETE CASCADE,
    day              TEXT    NOT NULL,
    month            TEXT    NOT NULL,
    daily_requests   INTEGER NOT NULL DEFAULT 0,
    monthly_requests INTEGER NOT NULL DEFAULT 0,
    total_requests   INTEGER NOT NULL DEFAULT 0,
    updated_at       TEXT    NOT NULL
);

CREATE TRIGGER identities_usage_row AFTER INSERT ON identities
BEGIN
    INSERT OR IGNORE INTO identity_usage (identity_id, day, month, updated_at)
    VALUES (NEW.id, '1970-01-01', '1970-01', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
END;

-- The identity a key belongs to (NULL: none). Deleting an identity detaches its keys (tollgate
-- does it in the deleting transaction, bumping change_seq so caches drop them).
ALTER TABLE api_keys ADD COLUMN identity_id INTEGER REFERENCES identities (id) ON DELETE SET NULL;
CREATE INDEX api_keys_identity_id ON api_keys (identity_id) WHERE identity_id IS NOT NULL;
