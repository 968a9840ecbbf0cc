-- Cancel a task: ARGV = K, ttl, id. A waiting one (queued, claimed, scheduled) ends
-- cancelled at once and never runs: 'now'. A running one is asked to stop (its
-- process hears 'x <id>'): 'r'. Otherwise its final state ('S', 'F', 'C', 'D'), or
-- 'unknown'.
local id = ARGV[3]
local t = K .. 't:' .. id
local state = redis.call('HGET', t, 's')
if not state then
  return 'unknown'
end
if state == 'q' or state == 'c' or state == 's' then
  local ttl = tonumber(ARGV[2])
  if state == 's' then
    redis.call('ZREM', K .. 'sched', id)
    gauge('scheduled', -1)
  else
    gauge('queued', -1)
  end
  if state == 'q' then
    ttl = nil  -- its id stays in the queue until a claim drops it (and expires it)
  end
  count('cancelled')
  finish(t, id, 'C', now_ms(), ttl)
  check_idle()
  return 'now'
elseif state == 'r' then
  redis.call('HSET', t, 'k', 1)
  publish('x ' .. id)
  return 'r'
end
return state
