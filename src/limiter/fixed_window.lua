-- Fixed window: one atomic step per hit (DESIGN rule 3).
--
-- Why Lua: "does this cost still fit?", the increment and the expiry must happen as one step on
-- the server. As separate commands, two replicas could both see room for the last hit, and a
-- client dying between INCRBY and PEXPIRE would leave a counter that never expires. Redis runs a
-- script without interleaving other commands, and it needs one round trip.
--
-- The arithmetic is limiter::fixed_hit / fixed_refund in src/limiter/mod.rs; keep them in step.
--
-- KEYS[1]  this window's counter: <prefix>{<counter key>}:fw:<window s>:<window start ms>
-- ARGV[1]  "hit" or "refund"
-- ARGV[2]  limit
-- ARGV[3]  cost
-- ARGV[4]  the key's time to live (ms): until the window ends, plus a few seconds' grace
--          for replicas whose clocks are a little behind
-- Returns {allowed (1/0), the window's count after this call}.

local count = tonumber(redis.call('GET', KEYS[1]) or '0')
local cost = tonumber(ARGV[3])

if ARGV[1] == 'refund' then
  if count > 0 then
    count = redis.call('DECRBY', KEYS[1], math.min(cost, count))
  end
  return {1, count}
end

if count + cost <= tonumber(ARGV[2]) then
  count = redis.call('INCRBY', KEYS[1], cost)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {1, count}
end
return {0, count}
