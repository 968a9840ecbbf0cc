-- Move a periodic's planned occurrence to `due`: ARGV = K, ttl, key, due, only_sooner.
-- Returns 1 if it moved, else 0 (not planned, or only_sooner declined).
local key, due = ARGV[3], tonumber(ARGV[4])
local current = tonumber(redis.call('ZSCORE', K .. 'pers', key))
if not current or (ARGV[5] == '1' and due >= current) then
  return 0
end
plan(key, due)
return 1
