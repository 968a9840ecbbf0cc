-- Fire periodics' due occurrences: ARGV = K, ttl, then for each occurrence key,
-- grid, next_grid, next_due. Each only if its periodic's planned grid is still
-- `grid` (another process may have fired it: then {0, 0}). The next occurrence is
-- planned at next_due ('' for none: a fixed-delay periodic plans when its run ends).
-- The occurrence becomes a run (a task of the periodic's key): {1, id}; or, when the
-- previous run has not started yet, merges into it: {2, id} (coalesced). Returns
-- one such pair per occurrence, in order.
local now = now_ms()
local out = {}
for i = 3, #ARGV, 4 do
  local key, grid, next_grid, next_due = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local ph = K .. 'per:' .. key
  local f = redis.call('HMGET', ph, 'state', 'grid', 'rn', 'ra', 'ro', 'rg')
  if f[1] ~= 'a' or f[2] ~= grid then
    out[#out + 1] = {0, 0}
  else
    if next_due ~= '' then
      redis.call('HSET', ph, 'grid', next_grid)
      plan(key, tonumber(next_due))
    else
      redis.call('ZREM', K .. 'pers', key)
    end
    local pending = redis.call('HGET', K .. 'key:' .. key, 'p')
    if pending then
      redis.call('HINCRBY', ph, 'coalesced', 1)
      count('coalesced')
      out[#out + 1] = {2, tonumber(pending)}
    else
      local id = create(f[3], f[4], f[5] or '', key, f[6] or '', key, now, now)
      redis.call('HSET', ph, 'last', id)
      out[#out + 1] = {1, id}
    end
  end
end
flush()
return out
