-- A worker's one round trip per task: settle the attempt it finished and start the
-- one it took. ARGV = K, ttl, proc, done_id, kind, value, error, delay_ms, next_id
-- (done_id or next_id may be '').
-- kind: 'ok' (value is the result), 'retry' (after delay_ms), 'fail', 'base' (a
-- BaseException: result() raises it itself), 'cancel'. Only a task in the process's
-- claim set can be settled or started: a process that lost it (presumed dead, its
-- claims passed on) changes nothing. An attempt that failed after cancel() asked
-- for it ends cancelled. Returns {settled (1, 0 fenced, -1 none), start} where
-- start is {'ok', attempts}, {'lost'}, {'cancelled'} or {}.
local proc = ARGV[3]
local claims = K .. 'claims:' .. proc
local now = now_ms()
local ttl = tonumber(ARGV[2])
local settled = -1
local done = ARGV[4]
if done ~= '' then
  settled = 0
  if redis.call('SREM', claims, done) == 1 then
    settled = 1
    local t = K .. 't:' .. done
    local kind, value, err = ARGV[5], ARGV[6], ARGV[7]
    gauge('running', -1)
    if err ~= '' then
      append_error(t, err)
    end
    if kind ~= 'ok' and redis.call('HEXISTS', t, 'k') == 1 then
      kind = 'cancel'
    end
    if kind == 'ok' then
      redis.call('HSET', t, 'v', value)
      count('succeeded')
      finish(t, done, 'S', now, ttl)
    elseif kind == 'retry' then
      redis.call('HINCRBY', t, 'f', 1)
      redis.call('HDEL', t, 'p', 'lo')
      count('retried')
      local delay = tonumber(ARGV[8])
      if delay > 0 then
        redis.call('HSET', t, 's', 's', 'd', now + delay)
        gauge('scheduled', 1)
        schedule(done, now + delay)
      else
        redis.call('HSET', t, 's', 'q', 'd', now)
        gauge('queued', 1)
        enqueue(redis.call('HGET', t, 'n'), done, false)
      end
    elseif kind == 'fail' or kind == 'base' then
      redis.call('HINCRBY', t, 'f', 1)
      if kind == 'base' then
        redis.call('HSET', t, 'x', 'b')
      end
      count('failed')
      finish(t, done, 'F', now, ttl)
    else
      count('cancelled')
      finish(t, done, 'C', now, ttl)
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
    local state = redis.call('HGET', t, 's')
    if state == 'c' then
      redis.call('HSET', t, 's', 'r')
      gauge('queued', -1)
      gauge('running', 1)
      start = {'ok', redis.call('HINCRBY', t, 'at', 1)}
    elseif state == 'r' then
      start = {'ok', tonumber(redis.call('HGET', t, 'at'))}  -- retried after a lost reply
    else
      redis.call('SREM', claims, nxt)  -- cancelled while claimed
      start = {'cancelled'}
    end
  end
end
if settled == 1 then
  check_idle()
end
return {settled, start}
