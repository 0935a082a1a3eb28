-- Sliding window (two-window weighted counter): one atomic step per hit (DESIGN rule 3).
--
-- Why Lua: reading both windows' counts, rolling them when the window turns, deciding, writing
-- and setting the expiry must be one step on the server, or two replicas could both admit the
-- last hit. Redis runs a script without interleaving other commands, in one round trip.
--
-- The arithmetic is limiter::sliding_hit / sliding_refund in src/limiter/mod.rs; keep them in
-- step. Everything is integer milliseconds; Lua's doubles hold them exactly below 2^53.
--
-- KEYS[1]  hash <prefix>{<counter key>}:sw:<window s> with fields
--          s = start of the current window (ms), p = previous window's count, c = current's
-- ARGV[1]  "hit" or "refund"
-- ARGV[2]  limit
-- ARGV[3]  cost
-- ARGV[4]  window (ms)
-- ARGV[5]  now (ms, tollgate's clock)
-- ARGV[6]  grace (ms) the key outlives its use, for replicas whose clocks are a little behind
-- Returns {allowed (1/0), previous count, current count, ms since the current window began}.

local cost = tonumber(ARGV[3])
local w = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
local st = redis.call('HMGET', KEYS[1], 's', 'p', 'c')
local s = tonumber(st[1]) or 0
local p = tonumber(st[2]) or 0
local c = tonumber(st[3]) or 0

-- A clock behind the stored window (another replica's is ahead) counts in the stored window.
if now < s then now = s end
local start = now - (now % w)
local e = now - start

if ARGV[1] == 'refund' then
  if start == s and c > 0 then
    c = math.max(c - cost, 0)
    redis.call('HSET', KEYS[1], 'c', string.format('%.0f', c))
  end
  return {1, p, c, e}
end

if start ~= s then
  if start == s + w then p = c else p = 0 end
  c = 0
end

if p * (w - e) + (c + cost) * w <= tonumber(ARGV[2]) * w then
  c = c + cost
  redis.call('HSET', KEYS[1], 's', string.format('%.0f', start),
    'p', string.format('%.0f', p), 'c', string.format('%.0f', c))
  -- This window's count matters until the end of the next one.
  redis.call('PEXPIRE', KEYS[1], string.format('%.0f', start + 2 * w - now + tonumber(ARGV[6])))
  return {1, p, c, e}
end
return {0, p, c, e}
