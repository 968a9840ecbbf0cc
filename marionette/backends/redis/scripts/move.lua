-- Move a scheduled task (delayed, scheduled, or waiting for a retry) to `due`:
-- ARGV = K, ttl, id, due, only_sooner ('1'). Returns 1 if it moved, else 0.
local id, due = ARGV[3], tonumber(ARGV[4])
if redis.call('HGET', K .. 't:' .. id, 's') ~= 's' then
  return 0
end
local current = tonumber(redis.call('ZSCORE', K .. 'sched', id))
if not current or (ARGV[5] == '1' and due >= current) then
  return 0
end
announce(due)
redis.call('ZADD', K .. 'sched', due, id)
redis.call('HSET', K .. 't:' .. id, 'd', due)
return 1
