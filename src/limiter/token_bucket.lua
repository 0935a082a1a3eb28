-- Token bucket (GCRA): one atomic step per hit (DESIGN rule 3).
--
-- Why Lua: reading the theoretical arrival time (TAT), deciding, moving it and setting the
-- expiry must be one step on the server, or two replicas could both admit the last hit. Redis
-- runs a script without interleaving other commands, in one round trip.
--
-- The arithmetic is limiter::bucket_hit / bucket_refund in src/limiter/mod.rs; keep them in
-- step. TAT = b + d / limit ms: the debt d is kept in 1/limit ms, so the emission interval
-- (window / limit) is exactly `window ms` of them and nothing is rounded.
--
-- KEYS[1]  hash <prefix>{<counter key>}:tb:<window s> with fields b (ms) and d
-- ARGV[1]  "hit" or "refund"
-- ARGV[2]  limit
-- ARGV[3]  cost
-- ARGV[4]  window (ms)
-- ARGV[5]  now (ms, tollgate's clock)
-- ARGV[6]  grace (ms) the key outlives its use, for replicas whose clocks are a little behind
-- Returns {allowed (1/0), debt after the hit (allowed) or before it (refused)}.

local limit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local w = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
local st = redis.call('HMGET', KEYS[1], 'b', 'd')
local b = tonumber(st[1]) or 0
local d = tonumber(st[2]) or 0

-- A clock behind the stored base (another replica's is ahead) counts from the base.
if now < b then now = b end
local elapsed = now - b
if elapsed >= w then d = 0 else d = math.max(d - elapsed * limit, 0) end

local function store(debt)
  if debt <= 0 then
    redis.call('DEL', KEYS[1])
    return
  end
  redis.call('HSET', KEYS[1], 'b', string.format('%.0f', now), 'd', string.format('%.0f', debt))
  -- The bucket is full again, and the key can go, once now reaches the TAT.
  redis.call('PEXPIRE', KEYS[1], string.format('%.0f', math.floor(debt / limit) + 1 + tonumber(ARGV[6])))
end

if ARGV[1] == 'refund' then
  if st[1] then store(math.max(d - cost * w, 0)) end
  return {1, 0}
end

local need = d + cost * w
if need <= limit * w then
  store(need)
  return {1, need}
end
return {0, d}
