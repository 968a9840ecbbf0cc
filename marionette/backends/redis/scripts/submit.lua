-- Submit a task: ARGV = K, ttl, proc, lane, token, name, payload, options, mode, when,
-- key, group, retried. mode 'q' queues it now, 'd' delays it `when` ms, 'a'
-- schedules it at `when` (ms since the epoch). Returns {id, new}: new is 0 when the
-- key's pending task was returned instead of a new one. Idempotent per (proc, lane,
-- token): a call retried after a lost reply ('1') returns what the first call did.
--
-- The common case first, before the shared definitions (Lua makes a script's
-- closures anew on every call, and a submission is the hot path of every producer):
-- a task queued now, without key or group, not a retried call. It does what
-- create() and enqueue() do, and nothing else.
if ARGV[9] == 'q' and ARGV[11] == '' and ARGV[12] == '' and ARGV[13] ~= '1' then
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local id = redis.call('INCR', K .. 'id')
  local t = K .. 't:' .. id
  if ARGV[8] == '' then
    redis.call('HSET', t, 'n', ARGV[6], 'a', ARGV[7], 'T', now, 's', 'q')
  else
    redis.call('HSET', t, 'n', ARGV[6], 'a', ARGV[7], 'T', now, 's', 'q', 'o', ARGV[8])
  end
  if redis.call('LPUSH', K .. 'q:' .. ARGV[6], id) == 1 then
    redis.call('SADD', K .. 'names', ARGV[6])
    redis.call('PUBLISH', K .. 'wake', 'r ' .. ARGV[6])
  end
  redis.call('HINCRBY', K .. 'stats', 'queued', 1)
  redis.call('HSET', K .. 'lanes:' .. ARGV[3], ARGV[4], ARGV[5] .. ' ' .. id)
  return {id, 1}
end
-- common --
local proc, lane, token = ARGV[3], ARGV[4], ARGV[5]
local name, payload, options, mode, when = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local key, group = ARGV[11], ARGV[12]
local lanes = K .. 'lanes:' .. proc
local seen = ARGV[13] == '1' and redis.call('HGET', lanes, lane)
if seen then
  local space = string.find(seen, ' ', 1, true)
  if string.sub(seen, 1, space - 1) == token then
    local id = tonumber(string.sub(seen, space + 1))
    return {math.abs(id), id > 0 and 1 or 0}
  end
end
local id
local new = 1
if key ~= '' then
  local pending = redis.call('HGET', K .. 'key:' .. key, 'p')
  if pending then
    id, new = tonumber(pending), 0
  end
end
if new == 1 then
  local now = now_ms()
  local due = now
  if mode == 'd' then
    due = soonest_ms() + tonumber(when)
  elseif mode == 'a' then
    due = tonumber(when)
  end
  id = create(name, payload, options, key, group, '', now, due)
end
redis.call('HSET', lanes, lane, token .. ' ' .. (new == 1 and id or -id))
flush()
return {id, new}
