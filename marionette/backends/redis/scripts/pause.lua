-- Pause (ARGV[4] 'p') or end (ARGV[4] 'x') a periodic for the whole cluster: ARGV =
-- K, ttl, key, how. Its planned occurrence and a run not yet started are dropped
-- (a running run finishes). Returns the run cancelled (its id) or 0; -1 when the
-- periodic is not active (pause) or unknown.
local key, how = ARGV[3], ARGV[4]
local ph = K .. 'per:' .. key
local state = redis.call('HGET', ph, 'state')
if not state or (how == 'p' and state ~= 'a') then
  return -1
end
redis.call('ZREM', K .. 'pers', key)
if how == 'p' then
  redis.call('HSET', ph, 'state', 'p')
else
  redis.call('DEL', ph)
  redis.call('SREM', K .. 'periodics', key)
end
local pending = redis.call('HGET', K .. 'key:' .. key, 'p')
if pending and cancel_waiting(pending, now_ms()) then
  check_idle()
  return tonumber(pending)
end
flush()
return 0
