-- Move up to `max` scheduled tasks that are due into their queues, and list the
-- periodics whose occurrence is due: ARGV = K, ttl, max, hold_ms. Atomic, so each due
-- task is promoted once whichever processes race to do it. A listed occurrence is
-- held for this caller: its periodic's plan moves `hold_ms` ahead, so that processes
-- woken at the same instant share the due occurrences instead of all racing for
-- each; `fire` then plans the next one (and fires once: it checks the grid it was
-- given). If the caller dies first, the hold ends and another process fires it.
-- Returns {promoted, wait_ms until the next due task or occurrence (-1: none), now,
-- {key, grid, definition}...}.
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
local out = {#ids, -1, now}
for _, key in ipairs(redis.call('ZRANGEBYSCORE', K .. 'pers', '-inf', now, 'LIMIT', 0, 100)) do
  local f = redis.call('HMGET', K .. 'per:' .. key, 'grid', 'def')
  if f[2] then
    out[#out + 1] = {key, f[1], f[2]}
    redis.call('ZADD', K .. 'pers', now + tonumber(ARGV[4]), key)
  else
    redis.call('ZREM', K .. 'pers', key)  -- cancelled meanwhile
  end
end
local wait = -1
for _, zset in ipairs({sched, K .. 'pers'}) do
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if first[2] and (wait < 0 or tonumber(first[2]) - now < wait) then
    wait = math.max(0, tonumber(first[2]) - now)
  end
end
out[2] = wait
flush()
return out
