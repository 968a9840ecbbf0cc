-- Shared by every script (prepended at load time). ARGV[1] is the namespace's key
-- prefix, "{ns}:": every key carries that hash tag, so one cluster slot holds them
-- all; ARGV[2] is the result TTL in ms. Times are the server's (TIME), in ms: one
-- clock for the cluster, whatever the processes' clocks say.
--
-- A task is the hash K..'t:'..id. Its state 's' is one of
--   q queued (in its name's list K..'q:'..name, due), c claimed by a process (in
--   its set K..'claims:'..proc, not started), k parked behind the running task of
--   its key, g waiting for a slot of its group (in K..'gw:'..group), s scheduled (in
--   the zset K..'sched'), r running, S succeeded, F failed, C cancelled, D dead
--   (its payload could not be read).
-- Its other fields: n name, a payload, o options (JSON), T submitted, d due, at
-- attempts, f failed attempts, lo lost attempts in a row, e errors (a JSON list),
-- v result, x 'b' when a BaseException ended it, E ended, p the process holding it,
-- w someone waits for it, k cancel requested while it runs, K its key, G its group,
-- P its periodic, rv it holds a group slot reserved when it left the waiting list.
-- A key (K..'key:'..key) names its pending task p (submitted, not started) and its
-- running one r (started, not ended for good: a retry's wait counts). A group
-- (K..'g:'..group) has a limit and the slots it holds (running: claimed or
-- running). A periodic (K..'per:'..key) is planned in the zset K..'pers'.
-- Gauges in K..'stats': queued counts q, c, k and g; scheduled s; running r; when
-- all three reach zero an 'i' message tells join() that the cluster is idle. Its
-- counters: succeeded, failed, retried, cancelled, coalesced, resubmitted (dead
-- letters requeued); submitted is the id counter plus resubmitted.
-- Messages on K..'wake': 'r <name>' a queue became non-empty, 'd <ms>' an earlier
-- due time, 'f <id>' a watched task finished, 'x <id>' cancel a running attempt,
-- 'i' the cluster went idle.

local K = ARGV[1]
local TTL = tonumber(ARGV[2])

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The server's time in ms rounded up: what a delay is added to, so that a task
-- delayed by d ms is never due before d ms from its submission (now_ms() is floored,
-- and promote compares with it, so no due time is ever reached early).
local function soonest_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.ceil(tonumber(t[2]) / 1000)
end

-- A number in [0, 1) for jitter (the server's microseconds: scripts have no RNG).
local function chance()
  local t = redis.call('TIME')
  return (tonumber(t[2]) * 7919 % 1000003) / 1000003
end

local function publish(message)
  redis.call('PUBLISH', K .. 'wake', message)
end

-- Changes to the counters and gauges of K..'stats', summed while a script runs and
-- written once by flush() (a script that changes them ends with flush() or
-- check_idle()): a settle and a start in one step cancel out on 'running'.
local deltas = {}

local function gauge(field, delta)
  deltas[field] = (deltas[field] or 0) + delta
end

local function count(field)
  gauge(field, 1)
end

local function flush()
  for field, delta in pairs(deltas) do
    if delta ~= 0 then
      redis.call('HINCRBY', K .. 'stats', field, delta)
    end
  end
  deltas = {}
end

local function check_idle()
  flush()
  local g = redis.call('HMGET', K .. 'stats', 'queued', 'scheduled', 'running')
  if tonumber(g[1] or 0) <= 0 and tonumber(g[2] or 0) <= 0 and tonumber(g[3] or 0) <= 0 then
    publish('i')
  end
end

-- Put a due task at the back of its name's queue (or the front: 'front' is true
-- for tasks handed back or released by a gate, which waited already).
local function enqueue(name, id, front)
  local q = K .. 'q:' .. name
  local length
  if front then
    length = redis.call('RPUSH', q, id)
  else
    length = redis.call('LPUSH', q, id)
  end
  if length == 1 then
    redis.call('SADD', K .. 'names', name)  -- for inspect and pending()
    publish('r ' .. name)
  end
end

-- Announce a due time to the schedulers if it is earlier than every one they know.
local function announce(due)
  local a = redis.call('ZRANGE', K .. 'sched', 0, 0, 'WITHSCORES')
  local b = redis.call('ZRANGE', K .. 'pers', 0, 0, 'WITHSCORES')
  if (a[2] == nil or due < tonumber(a[2])) and (b[2] == nil or due < tonumber(b[2])) then
    publish('d ' .. due)
  end
end

-- Add a task to the shared schedule.
local function schedule(id, due)
  announce(due)
  redis.call('ZADD', K .. 'sched', due, id)
end

-- Plan a periodic's next occurrence.
local function plan(key, due)
  announce(due)
  redis.call('ZADD', K .. 'pers', due, key)
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

local function dead_letter(id, name, reason, now)
  redis.call('LPUSH', K .. 'dead',
    cjson.encode({id = tonumber(id), name = name, reason = reason, at = now}))
end

-- Groups --------------------------------------------------------------------------

-- Give waiting tasks of `group` the slots it has free, in the order they waited:
-- each goes to the front of its queue with its slot reserved.
local function group_release(group)
  local g = K .. 'g:' .. group
  local f = redis.call('HMGET', g, 'limit', 'running')
  local limit, running = tonumber(f[1]), tonumber(f[2] or 0)
  if not limit then
    return
  end
  local gw = K .. 'gw:' .. group
  while running < limit do
    local id = redis.call('LPOP', gw)
    if not id then
      break
    end
    local t = K .. 't:' .. id
    local s = redis.call('HMGET', t, 's', 'n')
    if s[1] == 'g' then
      redis.call('HSET', t, 's', 'q', 'rv', 1)
      redis.call('HINCRBY', g, 'running', 1)
      running = running + 1
      enqueue(s[2], id, true)
    end
  end
end

-- A slot of `group` is given back (an attempt ended, a claim was released).
local function group_free(group)
  redis.call('HINCRBY', K .. 'g:' .. group, 'running', -1)
  group_release(group)
end

-- Keys ----------------------------------------------------------------------------

local function key_started(key, id)
  local kh = K .. 'key:' .. key
  redis.call('HSET', kh, 'r', id)
  if redis.call('HGET', kh, 'p') == id then
    redis.call('HDEL', kh, 'p')
  end
end

-- Task `id` of `key` will never run again: it leaves the key, and the pending task
-- parked behind it (if it was the running one) goes to the front of its queue.
local function key_ended(key, id)
  local kh = K .. 'key:' .. key
  local f = redis.call('HMGET', kh, 'p', 'r')
  if f[1] == id then
    redis.call('HDEL', kh, 'p')
  end
  if f[2] == id then
    redis.call('HDEL', kh, 'r')
    if f[1] and f[1] ~= id then
      local t = K .. 't:' .. f[1]
      local s = redis.call('HMGET', t, 's', 'n')
      if s[1] == 'k' then
        redis.call('HSET', t, 's', 'q')
        enqueue(s[2], f[1], true)
      end
    end
  end
end

-- Whether a task about to be claimed may be: it is parked (k) while another task of
-- its key runs, and waits (g) while its group is at its limit or others wait first.
local function gate(t, id, key, group)
  if key then
    local r = redis.call('HGET', K .. 'key:' .. key, 'r')
    if r and r ~= id then
      redis.call('HSET', t, 's', 'k')
      if group and redis.call('HDEL', t, 'rv') == 1 then
        group_free(group)
      end
      return false
    end
  end
  if group then
    if redis.call('HDEL', t, 'rv') == 1 then
      return true
    end
    local g = K .. 'g:' .. group
    local f = redis.call('HMGET', g, 'limit', 'running')
    local limit = tonumber(f[1])
    if limit and (tonumber(f[2] or 0) >= limit or redis.call('LLEN', K .. 'gw:' .. group) > 0) then
      redis.call('HSET', t, 's', 'g')
      redis.call('RPUSH', K .. 'gw:' .. group, id)
      return false
    end
    redis.call('HINCRBY', g, 'running', 1)
  end
  return true
end

-- Periodics -----------------------------------------------------------------------

-- A run of periodic `key` ended for good: a fixed-delay periodic plans its next
-- occurrence from now (if no other run of it waits or runs).
local function periodic_ended(key, now)
  local ph = K .. 'per:' .. key
  local f = redis.call('HMGET', ph, 'state', 'fd', 'iv', 'jt')
  if f[1] == 'a' and f[2] == '1' and redis.call('EXISTS', K .. 'key:' .. key) == 0 then
    local grid = now + tonumber(f[3])
    redis.call('HSET', ph, 'grid', grid)
    plan(key, grid + math.floor(chance() * tonumber(f[4] or 0)))
  end
end

-- Settling ------------------------------------------------------------------------

-- A task settled for good: it leaves its key (and a fixed-delay periodic plans its
-- next run), it expires after the result TTL (a dead task, or one cancelled while its
-- id is still in a queue, gets no TTL until it leaves there: `expire` false), and its
-- waiters, if any, hear of it.
-- `f` is the task's fields K, P, n, w, G, k, lo when the caller has read them already;
-- `value` the result of a success (written with the state: one call less).
local function finish(t, id, state, now, expire, f, value)
  f = f or redis.call('HMGET', t, 'K', 'P', 'n', 'w', 'G', 'k', 'lo')
  if value then
    redis.call('HSET', t, 's', state, 'E', now, 'v', value)
  else
    redis.call('HSET', t, 's', state, 'E', now)
  end
  if f[6] or f[7] then
    redis.call('HDEL', t, 'k', 'lo')
  end
  if expire then
    redis.call('PEXPIRE', t, TTL)
  end
  if f[1] then
    key_ended(f[1], id)
  end
  if f[2] then
    periodic_ended(f[2], now)
  end
  if state == 'F' or state == 'D' then
    redis.call('HINCRBY', K .. 'failed', f[3], 1)
  end
  if f[4] then
    publish('f ' .. id)
  end
end

-- Cancel a task that has not started (q, c, k, g, s): it ends cancelled and never
-- runs. Returns whether it was such a task.
local function cancel_waiting(id, now)
  local t = K .. 't:' .. id
  local f = redis.call('HMGET', t, 's', 'G', 'rv')
  local s = f[1]
  if s ~= 'q' and s ~= 'c' and s ~= 'k' and s ~= 'g' and s ~= 's' then
    return false
  end
  if s == 's' then
    redis.call('ZREM', K .. 'sched', id)
    gauge('scheduled', -1)
  else
    gauge('queued', -1)
  end
  if f[2] and (s == 'c' or f[3]) then  -- it held a slot of its group
    redis.call('HDEL', t, 'rv')
    group_free(f[2])
  end
  count('cancelled')
  -- A queued id stays in its queue (dropped by the next claim): no TTL until then.
  finish(t, id, 'C', now, s ~= 'q')
  return true
end

local LOST = 'marionette.errors.WorkerLost'
local MAX_LOST = 3

-- An attempt or claim of a process that is gone (dead, or a stop that gave up on
-- it): a claimed task goes back to the front of its queue as if never claimed; a
-- running one counts a lost attempt (no retry used), and fails for good after
-- MAX_LOST in a row; one cancelled while it ran ends cancelled. Group slots they
-- held are given back.
local function release(id, proc, now)
  local t = K .. 't:' .. id
  local f = redis.call('HMGET', t, 's', 'n', 'k', 'G')
  local state, name, group = f[1], f[2], f[4]
  if state == 'c' then
    redis.call('HSET', t, 's', 'q')
    if group then
      group_free(group)
    end
    enqueue(name, id, true)
  elseif state == 'r' then
    gauge('running', -1)
    if group then
      group_free(group)
    end
    append_error(t, cjson.encode({type = LOST,
      message = 'the process running this attempt was lost', traceback = '',
      fields = {process = proc}}))
    local lost = redis.call('HINCRBY', t, 'lo', 1)
    if f[3] then
      count('cancelled')
      finish(t, id, 'C', now, true)
    elseif lost >= MAX_LOST then
      count('failed')
      finish(t, id, 'F', now, true)
    else
      redis.call('HSET', t, 's', 'q')
      gauge('queued', 1)
      enqueue(name, id, true)
    end
  end
end

-- Forget a process: its claims are released, its records deleted.
local function reap(proc, now)
  local claims = K .. 'claims:' .. proc
  for _, id in ipairs(redis.call('SMEMBERS', claims)) do
    release(id, proc, now)
  end
  redis.call('DEL', claims, K .. 'proc:' .. proc, K .. 'lanes:' .. proc)
  redis.call('ZREM', K .. 'procs', proc)
end

-- A new task, queued now or scheduled for `due`. Returns its id.
local function create(name, payload, options, key, group, periodic, now, due)
  local id = redis.call('INCR', K .. 'id')
  local t = K .. 't:' .. id
  local fields = {'n', name, 'a', payload, 'T', now}
  if options ~= '' then
    fields[#fields + 1], fields[#fields + 2] = 'o', options
  end
  if key ~= '' then
    fields[#fields + 1], fields[#fields + 2] = 'K', key
    redis.call('HSET', K .. 'key:' .. key, 'p', id)
  end
  if group ~= '' then
    fields[#fields + 1], fields[#fields + 2] = 'G', group
  end
  if periodic ~= '' then
    fields[#fields + 1], fields[#fields + 2] = 'P', periodic
  end
  local scheduled = due > now
  if scheduled then
    fields[#fields + 1], fields[#fields + 2] = 's', 's'
    fields[#fields + 1], fields[#fields + 2] = 'd', due
  else
    fields[#fields + 1], fields[#fields + 2] = 's', 'q'
  end
  redis.call('HSET', t, unpack(fields))
  if scheduled then
    gauge('scheduled', 1)
    schedule(id, due)
  else
    gauge('queued', 1)
    enqueue(name, id, false)
  end
  return id  -- (the id counter counts submissions: see Store.counters)
end
