-- Cancel a task: ARGV = K, ttl, id. A waiting one (queued, claimed, parked, waiting
-- for a group slot, scheduled) ends cancelled at once and never runs: 'now'. A
-- running one is asked to stop (its process hears 'x <id>'): 'r'. Otherwise its final
-- state ('S', 'F', 'C', 'D'), or 'unknown'.
local id = ARGV[3]
local state = redis.call('HGET', K .. 't:' .. id, 's')
if not state then
  return 'unknown'
end
if cancel_waiting(id, now_ms()) then
  check_idle()
  return 'now'
elseif state == 'r' then
  redis.call('HSET', K .. 't:' .. id, 'k', 1)
  publish('x ' .. id)
  return 'r'
end
return state
