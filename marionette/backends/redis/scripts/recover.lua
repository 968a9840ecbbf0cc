-- After a claim whose reply was lost: the tasks this process holds claimed and has
-- not started, so that it can queue them. ARGV = K, ttl, proc. Returns
-- {now, {id, name, payload, options, attempts, failures, submitted, errors}...} as
-- claim does.
local proc = ARGV[3]
local out = {now_ms()}
for _, id in ipairs(redis.call('SMEMBERS', K .. 'claims:' .. proc)) do
  local f = redis.call('HMGET', K .. 't:' .. id, 's', 'n', 'a', 'o', 'at', 'f', 'T', 'e')
  if f[1] == 'c' then
    out[#out + 1] = {id, f[2], f[3], f[4] or '', f[5] or '0', f[6] or '0', f[7], f[8] or ''}
  end
end
return out
