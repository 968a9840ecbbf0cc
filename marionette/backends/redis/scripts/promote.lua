-- Move up to `max` scheduled tasks that are due into their queues: ARGV = K, ttl, max.
-- Atomic, so each due task is promoted once whichever processes race to do it.
-- Returns {promoted, wait_ms until the next due task (-1: none), now}.
local now = now_ms()
local sched = K .. 'sched'
local ids = redis.call('ZRANGEBYSCORE', sched, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('ZREM', sched, id)
  local t = K .. 't:' .. id
  local f = redis.call('HMGET', t, 's', 'n')
  if f[1] == 's' then
    redis.call('HSET', t, 's', 'q')
    gauge('scheduled', -1)
    gauge('queued', 1)
    enqueue(f[2], id, false)
  elseif not f[1] then
    dead_letter(id, '', 'unknown task id', now)
  end
end
local first = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')
local wait = -1
if first[2] then
  wait = tonumber(first[2]) - now
end
return {#ids, wait, now}
