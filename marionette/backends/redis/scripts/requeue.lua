-- Put every dead letter's task back in its queue: ARGV = K, ttl. A requeue counts
-- as a new submission. Returns {requeued, dropped} (dropped: its task is gone).
local dead = K .. 'dead'
local requeued, dropped = 0, 0
while true do
  local entry = redis.call('RPOP', dead)
  if not entry then
    break
  end
  local id = tostring(cjson.decode(entry).id)
  local t = K .. 't:' .. id
  local f = redis.call('HMGET', t, 's', 'n')
  if f[1] == 'D' or f[1] == 'F' then
    redis.call('HSET', t, 's', 'q')
    redis.call('HDEL', t, 'E', 'x', 'K', 'P')  -- it no longer holds a key or a run
    redis.call('PERSIST', t)
    gauge('queued', 1)
    count('resubmitted')
    enqueue(f[2], id, false)
    requeued = requeued + 1
  else
    dropped = dropped + 1
  end
end
flush()
return {requeued, dropped}
