-- Read a task for its handler, and ask to hear when it finishes: ARGV = K, ttl, id.
-- Returns the fields s, n, o, at, T, E, d, v, e, x (false where absent), or false
-- when the task is unknown (or its result expired).
local t = K .. 't:' .. ARGV[3]
local f = redis.call('HMGET', t, 's', 'n', 'o', 'at', 'T', 'E', 'd', 'v', 'e', 'x')
if not f[1] then
  return false
end
local s = f[1]
if s ~= 'S' and s ~= 'F' and s ~= 'C' and s ~= 'D' then
  redis.call('HSET', t, 'w', 1)
end
return f
