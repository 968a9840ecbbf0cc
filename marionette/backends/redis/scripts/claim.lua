-- Claim up to `max` due tasks for a process: ARGV = K, ttl, proc, max, names...
-- Each goes from its name's queue into the process's claim set (state c), unless a
-- gate sets it aside: parked behind the running task of its key, or waiting for a
-- slot of its group. Returns {now, {id, name, payload, options, attempts, failures,
-- submitted, errors}...}, or {-1} when the process has no lease (it was presumed
-- dead: it must join anew). Ids of tasks cancelled while queued are dropped here
-- (their TTL starts now); an id whose task is gone becomes a dead letter.
local proc, left = ARGV[3], tonumber(ARGV[4])
if not redis.call('ZSCORE', K .. 'procs', proc) then
  return {-1}
end
local now = now_ms()
local claims = K .. 'claims:' .. proc
local out = {now}
for i = 5, #ARGV do
  if left <= 0 then
    break
  end
  local name = ARGV[i]
  local q = K .. 'q:' .. name
  while left > 0 do
    local id = redis.call('RPOP', q)
    if not id then
      break
    end
    local t = K .. 't:' .. id
    local f = redis.call('HMGET', t, 's', 'a', 'o', 'at', 'f', 'T', 'e', 'K', 'G')
    if f[1] == 'q' then
      if gate(t, id, f[8], f[9]) then
        redis.call('HSET', t, 's', 'c')
        redis.call('SADD', claims, id)
        out[#out + 1] = {id, name, f[2], f[3] or '', f[4] or '0', f[5] or '0', f[6], f[7] or ''}
        left = left - 1
      end
    elseif f[1] == 'C' then
      redis.call('PEXPIRE', t, TTL)  -- cancelled while queued: it leaves the queue now
    elseif not f[1] then
      dead_letter(id, name, 'unknown task id', now)
    end
  end
end
return out
