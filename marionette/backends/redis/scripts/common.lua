-- Shared by every script (prepended at load time). ARGV[1] is the namespace's key
-- prefix, "{ns}:": every key carries that hash tag, so one cluster slot holds them
-- all. Times are the server's (TIME), in milliseconds: one clock for the cluster.
--
-- A task is the hash K..'t:'..id. Its state field 's' is one of
--   q queued (in its name's list, due), c claimed by a process (not started),
--   r running, s scheduled (in the 'sched' zset), S succeeded, F failed,
--   C cancelled, D dead (its payload could not be read).
-- Gauges in K..'stats': queued counts q and c, scheduled s, running r; when all three
-- reach zero, an 'i' message tells join() the cluster is idle.
-- Messages on K..'wake': 'r <name>' a queue became non-empty, 'd <ms>' an earlier
-- due time, 'f <id>' a watched task finished, 'x <id>' cancel a running attempt,
-- 'i' the cluster went idle.

local K = ARGV[1]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function publish(message)
  redis.call('PUBLISH', K .. 'wake', message)
end

local function gauge(field, delta)
  redis.call('HINCRBY', K .. 'stats', field, delta)
end

local function count(field)
  redis.call('HINCRBY', K .. 'stats', field, 1)
end

local function check_idle()
  local g = redis.call('HMGET', K .. 'stats', 'queued', 'scheduled', 'running')
  if tonumber(g[1] or 0) <= 0 and tonumber(g[2] or 0) <= 0 and tonumber(g[3] or 0) <= 0 then
    publish('i')
  end
end

-- Put a due task at the back of its name's queue (or the front: 'front' is true
-- for tasks handed back, which waited already).
local function enqueue(name, id, front)
  local q = K .. 'q:' .. name
  local length
  if front then
    length = redis.call('RPUSH', q, id)
  else
    length = redis.call('LPUSH', q, id)
  end
  if length == 1 then
    publish('r ' .. name)
  end
end

-- Add a task to the shared schedule; announce it if it is now the earliest.
local function schedule(id, due)
  local sched = K .. 'sched'
  local first = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')
  redis.call('ZADD', sched, due, id)
  if first[2] == nil or due < tonumber(first[2]) then
    publish('d ' .. due)
  end
end

-- Append one encoded error (a JSON object) to the task's error list.
local function append_error(t, err)
  local errors = redis.call('HGET', t, 'e')
  if errors then
    redis.call('HSET', t, 'e', string.sub(errors, 1, -2) .. ',' .. err .. ']')
  else
    redis.call('HSET', t, 'e', '[' .. err .. ']')
  end
end

-- A task settled for good: it expires after the result TTL (ttl ms; a dead task,
-- or one cancelled while its id is still in a queue, gets no TTL until it leaves
-- there: ttl nil), and its waiters, if any, hear of it.
local function finish(t, id, state, now, ttl)
  redis.call('HSET', t, 's', state, 'E', now)
  redis.call('HDEL', t, 'p', 'lo', 'k', 'd')
  if ttl then
    redis.call('PEXPIRE', t, ttl)
  end
  if state == 'F' or state == 'D' then
    redis.call('HINCRBY', K .. 'failed', redis.call('HGET', t, 'n'), 1)
  end
  if redis.call('HEXISTS', t, 'w') == 1 then
    publish('f ' .. id)
  end
end

local function dead_letter(id, name, reason, now)
  redis.call('LPUSH', K .. 'dead',
    cjson.encode({id = tonumber(id), name = name, reason = reason, at = now}))
end

local LOST = 'marionette.errors.WorkerLost'
local MAX_LOST = 3

-- An attempt or claim of a process that is gone (dead, or a stop that gave up on
-- it): a claimed task goes back to the front of its queue as if never claimed; a
-- running one counts a lost attempt (no retry used), and fails for good after
-- MAX_LOST in a row; one cancelled while it ran ends cancelled.
local function release(id, proc, now, ttl)
  local t = K .. 't:' .. id
  local f = redis.call('HMGET', t, 's', 'n', 'lo', 'k')
  local state, name = f[1], f[2]
  if state == 'c' then
    redis.call('HSET', t, 's', 'q')
    redis.call('HDEL', t, 'p')
    enqueue(name, id, true)
  elseif state == 'r' then
    gauge('running', -1)
    append_error(t, cjson.encode({type = LOST,
      message = 'the process running this attempt was lost', traceback = '',
      fields = {process = proc}}))
    local lost = redis.call('HINCRBY', t, 'lo', 1)
    if f[4] then
      count('cancelled')
      finish(t, id, 'C', now, ttl)
    elseif lost >= MAX_LOST then
      count('failed')
      finish(t, id, 'F', now, ttl)
    else
      redis.call('HSET', t, 's', 'q')
      redis.call('HDEL', t, 'p')
      gauge('queued', 1)
      enqueue(name, id, true)
    end
  end
end

-- Forget a process: its claims are released, its records deleted.
local function reap(proc, now, ttl)
  local claims = K .. 'claims:' .. proc
  for _, id in ipairs(redis.call('SMEMBERS', claims)) do
    release(id, proc, now, ttl)
  end
  redis.call('DEL', claims, K .. 'proc:' .. proc, K .. 'lanes:' .. proc)
  redis.call('ZREM', K .. 'procs', proc)
end
