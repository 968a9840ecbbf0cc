-- A worker's one round trip per task: settle the attempt it finished and start the
-- one it took. ARGV = K, ttl, proc, done_id, kind, value, error, delay_ms, next_id
-- (done_id or next_id may be ''). A group slot is given back when an attempt ends;
-- a started task becomes its key's running task.
-- kind: 'ok' (value is the result), 'retry' (after delay_ms), 'fail', 'base' (a
-- BaseException: result() raises it itself), 'cancel'. Only a task in the process's
-- claim set can be settled or started: a process that lost it (presumed dead, its
-- claims passed on) changes nothing. An attempt that failed after cancel() asked
-- for it ends cancelled. Returns {settled (1, 0 fenced, -1 none), start} where
-- start is {'ok', attempts}, {'lost'}, {'cancelled'} or {}. The hot path of every
-- task: its Redis calls are counted.
local proc = ARGV[3]
local claims = K .. 'claims:' .. proc
local now = now_ms()
local settled = -1
local done = ARGV[4]
if done ~= '' then
  settled = 0
  if redis.call('SREM', claims, done) == 1 then
    settled = 1
    local t = K .. 't:' .. done
    local kind, value, err = ARGV[5], ARGV[6], ARGV[7]
    local f = redis.call('HMGET', t, 'K', 'P', 'n', 'w', 'G', 'k', 'lo')
    gauge('running', -1)
    if f[5] then  -- the attempt's slot: a retry's wait holds none
      group_free(f[5])
    end
    if err ~= '' then
      append_error(t, err)
    end
    if kind ~= 'ok' and f[6] then
      kind = 'cancel'
    end
    if kind == 'ok' then
      count('succeeded')
      finish(t, done, 'S', now, true, f, value)
    elseif kind == 'retry' then
      redis.call('HINCRBY', t, 'f', 1)
      if f[7] then
        redis.call('HDEL', t, 'lo')
      end
      count('retried')
      local delay = tonumber(ARGV[8])
      if delay > 0 then
        local due = soonest_ms() + delay
        redis.call('HSET', t, 's', 's', 'd', due)
        gauge('scheduled', 1)
        schedule(done, due)
      else
        redis.call('HSET', t, 's', 'q', 'd', now)
        gauge('queued', 1)
        enqueue(f[3], done, false)
      end
    elseif kind == 'fail' or kind == 'base' then
      redis.call('HINCRBY', t, 'f', 1)
      if kind == 'base' then
        redis.call('HSET', t, 'x', 'b')
      end
      count('failed')
      finish(t, done, 'F', now, true, f)
    else
      count('cancelled')
      finish(t, done, 'C', now, true, f)
    end
  end
end
local start = {}
local nxt = ARGV[9]
if nxt ~= '' then
  local t = K .. 't:' .. nxt
  if redis.call('SISMEMBER', claims, nxt) == 0 then
    start = {'lost'}
  else
    local f = redis.call('HMGET', t, 's', 'K', 'P', 'at')
    if f[1] == 'c' then
      local attempt = tonumber(f[4] or 0) + 1
      redis.call('HSET', t, 's', 'r', 'at', attempt)
      gauge('queued', -1)
      gauge('running', 1)
      if f[2] then
        key_started(f[2], nxt)
      end
      if f[3] and attempt == 1 then
        redis.call('HINCRBY', K .. 'per:' .. f[3], 'runs', 1)
      end
      start = {'ok', attempt}
    elseif f[1] == 'r' then
      start = {'ok', tonumber(f[4])}  -- retried after a lost reply
    else
      redis.call('SREM', claims, nxt)  -- cancelled while claimed
      start = {'cancelled'}
    end
  end
end
if settled == 1 and start[1] ~= 'ok' then
  check_idle()  -- a settle without a start may leave the cluster idle
else
  flush()
end
return {settled, start}
