-- Renew a process's lease and reap the processes whose lease ran out: ARGV = K, ttl,
-- proc, lease_ms, info, register ('1' to (re)join). Returns {'ok', now, reaped, end}
-- (end: when the next lease of another process ends, ms; -1 when no other process
-- holds one) or {'lost', now} when this process was presumed dead and reaped: its
-- claims passed to others, and it must join again under a new id.
local proc, lease = ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local procs = K .. 'procs'
if ARGV[6] ~= '1' and not redis.call('ZSCORE', procs, proc) then
  return {'lost', now}
end
redis.call('ZADD', procs, now + lease, proc)
if ARGV[5] ~= '' then
  redis.call('SET', K .. 'proc:' .. proc, ARGV[5])
end
local reaped = 0
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', procs, '-inf', now, 'LIMIT', 0, 16)) do
  if gone ~= proc then
    reap(gone, now)
    reaped = reaped + 1
  end
end
if reaped > 0 then
  check_idle()
end
flush()
local first, ends = redis.call('ZRANGE', procs, 0, 1, 'WITHSCORES'), -1
if first[1] and first[1] ~= proc then
  ends = tonumber(first[2])
elseif first[3] then
  ends = tonumber(first[4])
end
return {'ok', now, reaped, ends}
