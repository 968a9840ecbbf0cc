-- A stopping process gives back tasks it claimed: ARGV = K, ttl, proc, ids...
-- Claimed ones go back to the front of their queues at once; running ones (a stop
-- that timed out) count a lost attempt and run again elsewhere. Returns how many.
local proc = ARGV[3]
local claims = K .. 'claims:' .. proc
local now = now_ms()
local n = 0
for i = 4, #ARGV do
  if redis.call('SREM', claims, ARGV[i]) == 1 then
    release(ARGV[i], proc, now)
    n = n + 1
  end
end
if n > 0 then
  check_idle()
end
flush()
return n
