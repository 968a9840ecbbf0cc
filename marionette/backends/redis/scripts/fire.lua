-- Fire a periodic's due occurrence: ARGV = K, ttl, key, grid, next_grid, next_due.
-- Only if its planned grid is still `grid` (another process may have fired it: then
-- {0}). The next occurrence is planned at next_due ('' for none: a fixed-delay
-- periodic plans when its run ends). The occurrence becomes a run (a task of the
-- periodic's key): {1, id}; or, when the previous run has not started yet, merges
-- into it: {2, id} (coalesced).
local key = ARGV[3]
local ph = K .. 'per:' .. key
local f = redis.call('HMGET', ph, 'state', 'grid', 'rn', 'ra', 'ro', 'rg')
if f[1] ~= 'a' or f[2] ~= ARGV[4] then
  return {0}
end
if ARGV[6] ~= '' then
  redis.call('HSET', ph, 'grid', ARGV[5])
  plan(key, tonumber(ARGV[6]))
else
  redis.call('ZREM', K .. 'pers', key)
end
local pending = redis.call('HGET', K .. 'key:' .. key, 'p')
if pending then
  redis.call('HINCRBY', ph, 'coalesced', 1)
  count('coalesced')
  flush()
  return {2, tonumber(pending)}
end
local now = now_ms()
local id = create(f[3], f[4], f[5] or '', key, f[6] or '', key, now, now)
redis.call('HSET', ph, 'last', id)
flush()
return {1, id}
