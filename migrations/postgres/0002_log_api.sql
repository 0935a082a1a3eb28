-- Which API a request-log row comes from: 'authz' (Check) or 'ratelimit' (ShouldRateLimit).
-- Usage counters agree with allowed 'authz' rows; 'ratelimit' rows never spend quota.
ALTER TABLE api_requests_log ADD COLUMN api TEXT NOT NULL DEFAULT 'authz'
    CHECK (api IN ('authz', 'ratelimit'));
