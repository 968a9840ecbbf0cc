-- A claimed task whose payload cannot be read goes to the dead letters: ARGV = K,
-- ttl, proc, id, reason. It fails (with a ValueError saying why) and is kept, with
-- no TTL, until `dead requeue` or `dead purge`.
local proc, id, reason = ARGV[3], ARGV[4], ARGV[5]
if redis.call('SREM', K .. 'claims:' .. proc, id) == 0 then
  return 0
end
local t = K .. 't:' .. id
local now = now_ms()
gauge('queued', -1)
local group = redis.call('HGET', t, 'G')
if group then
  group_free(group)
end
append_error(t, cjson.encode({type = 'ValueError', message = reason, traceback = ''}))
count('failed')
dead_letter(id, redis.call('HGET', t, 'n') or '', reason, now)
finish(t, id, 'D', now, false)
check_idle()
return 1
