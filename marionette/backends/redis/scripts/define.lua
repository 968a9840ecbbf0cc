-- Define a periodic, or join it: ARGV = K, ttl, key, definition, name, payload,
-- options, group, fixed_delay ('1' or ''), interval_ms, jitter_ms, grid, due.
-- The same definition joins it and keeps the cluster's schedule: 'joined'. A new key
-- makes it, first due at `due`: 'created'. Another definition replaces the stored
-- one and plans from `grid`/`due`: 'replaced'.
local key, definition = ARGV[3], ARGV[4]
local ph = K .. 'per:' .. key
local current = redis.call('HGET', ph, 'def')
if current == definition then
  return 'joined'
end
redis.call('HSET', ph, 'def', definition, 'rn', ARGV[5], 'ra', ARGV[6],
  'fd', ARGV[9], 'iv', ARGV[10], 'jt', ARGV[11])
for field, value in pairs({ro = ARGV[7], rg = ARGV[8]}) do
  if value == '' then
    redis.call('HDEL', ph, field)
  else
    redis.call('HSET', ph, field, value)
  end
end
if not current then
  redis.call('HSET', ph, 'state', 'a', 'runs', 0, 'coalesced', 0)
  redis.call('SADD', K .. 'periodics', key)
end
if redis.call('HGET', ph, 'state') == 'a' then
  redis.call('HSET', ph, 'grid', ARGV[12])
  plan(key, tonumber(ARGV[13]))
end
if current then
  return 'replaced'
end
return 'created'
