-- Submit a task: ARGV = K, ttl, proc, lane, token, name, payload, options, mode, when.
-- mode 'q' queues it now, 'd' delays it `when` ms, 'a' schedules it at `when` (ms
-- since the epoch). Returns its id. Idempotent per (proc, lane, token): a call
-- retried after a lost reply returns the id the first call made.
local proc, lane, token = ARGV[3], ARGV[4], ARGV[5]
local name, payload, options, mode, when = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local lanes = K .. 'lanes:' .. proc
local seen = redis.call('HGET', lanes, lane)
if seen then
  local space = string.find(seen, ' ', 1, true)
  if string.sub(seen, 1, space - 1) == token then
    return tonumber(string.sub(seen, space + 1))
  end
end
local now = now_ms()
local id = redis.call('INCR', K .. 'id')
local t = K .. 't:' .. id
local due = now
if mode == 'd' then
  due = now + tonumber(when)
elseif mode == 'a' then
  due = tonumber(when)
end
if due > now then
  redis.call('HSET', t, 'n', name, 'a', payload, 's', 's', 'T', now, 'd', due)
  gauge('scheduled', 1)
  schedule(id, due)
else
  redis.call('HSET', t, 'n', name, 'a', payload, 's', 'q', 'T', now)
  gauge('queued', 1)
  enqueue(name, id, false)
end
if options ~= '' then
  redis.call('HSET', t, 'o', options)
end
redis.call('SADD', K .. 'names', name)
count('submitted')
redis.call('HSET', lanes, lane, token .. ' ' .. id)
return id
