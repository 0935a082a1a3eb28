-- The request log, partitioned by UTC month, so that retention drops whole months (cheap)
-- instead of deleting rows. tollgate creates the months ahead of time and drops the old ones
-- (request_log.retention). Rows outside every monthly partition land in the default one.
ALTER TABLE api_requests_log RENAME TO api_requests_log_unpartitioned;
ALTER INDEX api_requests_log_key_ts RENAME TO api_requests_log_unpartitioned_key_ts;
ALTER INDEX api_requests_log_request_id RENAME TO api_requests_log_unpartitioned_request_id;

CREATE TABLE api_requests_log (
    id              BIGINT GENERATED ALWAYS AS IDENTITY,
    ts              TIMESTAMPTZ NOT NULL,
    request_id      TEXT,
    api_key_id      BIGINT,
    method          TEXT,
    path            TEXT,
    host            TEXT,
    client_addr     TEXT,
    decision        TEXT        NOT NULL CHECK (decision IN ('allow', 'deny')),
    reason          TEXT        NOT NULL,
    status          SMALLINT    NOT NULL,
    api             TEXT        NOT NULL DEFAULT 'authz' CHECK (api IN ('authz', 'ratelimit')),
    response_status SMALLINT,
    duration_ms     BIGINT,
    bytes_received  BIGINT,
    bytes_sent      BIGINT,
    PRIMARY KEY (id, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX api_requests_log_key_ts ON api_requests_log (api_key_id, ts);
CREATE INDEX api_requests_log_request_id ON api_requests_log (request_id);
CREATE TABLE api_requests_log_default PARTITION OF api_requests_log DEFAULT;

INSERT INTO api_requests_log (id, ts, request_id, api_key_id, method, path, host, client_addr,
        decision, reason, status, api, response_status, duration_ms, bytes_received, bytes_sent)
    OVERRIDING SYSTEM VALUE
    SELECT id, ts, request_id, api_key_id, method, path, host, client_addr, decision, reason,
        status, api, response_status, duration_ms, bytes_received, bytes_sent
    FROM api_requests_log_unpartitioned;
SELECT setval(pg_get_serial_sequence('api_requests_log', 'id'),
    GREATEST((SELECT max(id) FROM api_requests_log), 1));
DROP TABLE api_requests_log_unpartitioned;
