-- tollgate schema, SQLite dialect (the embedded default).
-- Times are RFC 3339 UTC text with milliseconds, so they sort as text.

CREATE TABLE api_keys (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL,
    prefix        TEXT    NOT NULL,
    key_hash      TEXT    NOT NULL UNIQUE,          -- hex SHA-256 of the key; the key itself is never stored
    status        TEXT    NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    expires_at    TEXT,
    per_minute    INTEGER CHECK (per_minute IS NULL OR per_minute > 0),
    daily_limit   INTEGER CHECK (daily_limit IS NULL OR daily_limit > 0),
    monthly_limit INTEGER CHECK (monthly_limit IS NULL OR monthly_limit > 0),
    created_at    TEXT    NOT NULL,
    updated_at    TEXT    NOT NULL,
    -- Bumped by every change to the row; running servers poll it to drop stale cache entries.
    change_seq    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX api_keys_change_seq ON api_keys (change_seq);

CREATE TABLE api_usage (
    api_key_id       INTEGER PRIMARY KEY REFERENCES api_keys (id),
    day              TEXT    NOT NULL,              -- UTC day the daily counter belongs to, YYYY-MM-DD
    month            TEXT    NOT NULL,              -- UTC month the monthly counter belongs to, YYYY-MM
    daily_requests   INTEGER NOT NULL DEFAULT 0,
    monthly_requests INTEGER NOT NULL DEFAULT 0,
    total_requests   INTEGER NOT NULL DEFAULT 0,
    updated_at       TEXT    NOT NULL
);

CREATE TABLE api_requests_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts          TEXT    NOT NULL,
    request_id  TEXT,
    api_key_id  INTEGER,
    method      TEXT,
    path        TEXT,
    host        TEXT,
    client_addr TEXT,
    decision    TEXT    NOT NULL CHECK (decision IN ('allow', 'deny')),
    reason      TEXT    NOT NULL,
    status      INTEGER NOT NULL
);
CREATE INDEX api_requests_log_key_ts ON api_requests_log (api_key_id, ts);
