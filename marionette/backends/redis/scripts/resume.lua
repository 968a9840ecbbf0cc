-- Resume a paused periodic, next due at `due` on the grid `grid` (no catch-up):
-- ARGV = K, ttl, key, grid, due. Returns 1, or 0 when it was not paused.
local key = ARGV[3]
local ph = K .. 'per:' .. key
if redis.call('HGET', ph, 'state') ~= 'p' then
  return 0
end
redis.call('HSET', ph, 'state', 'a', 'grid', ARGV[4])
plan(key, tonumber(ARGV[5]))
return 1
