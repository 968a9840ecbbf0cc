-- Set a group's limit: ARGV = K, ttl, group, limit, only_if_unset ('1': a process's
-- Config.limits, which sets a limit only where the cluster has none). Raising it
-- lets waiting tasks go at once. Returns the limit in force.
local group, limit = ARGV[3], ARGV[4]
local g = K .. 'g:' .. group
redis.call('SADD', K .. 'groups', group)
if ARGV[5] == '1' then
  redis.call('HSETNX', g, 'limit', limit)
else
  redis.call('HSET', g, 'limit', limit)
end
group_release(group)
return tonumber(redis.call('HGET', g, 'limit'))
