-- Drop every dead letter; their tasks expire after the result TTL: ARGV = K, ttl.
-- Returns how many were dropped.
local dead = K .. 'dead'
local n = 0
while true do
  local entry = redis.call('RPOP', dead)
  if not entry then
    break
  end
  local t = K .. 't:' .. tostring(cjson.decode(entry).id)
  if redis.call('HGET', t, 's') == 'D' then
    redis.call('PEXPIRE', t, TTL)
  end
  n = n + 1
end
return n
