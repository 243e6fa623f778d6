-- Runs after common.lua (prepended when loaded).
-- KEYS[1] lease marker, KEYS[1+i] key of check i (TPM, concurrency and budgets).
-- ARGV: now, lease id, lease ttl (us), extra tokens to charge now, n, then per check:
-- code, limit, arg. Renews the lease; returns 0 if a budget is exhausted, else 1.
local now = tonumber(ARGV[1])
local lease_id = ARGV[2]
local ttl = tonumber(ARGV[3])
local extra = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local ok = 1
redis.call('PEXPIRE', KEYS[1], ceil_ms(ttl))
for i = 1, n do
  local b = 5 + (i - 1) * 3
  local code, limit, arg = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local key = KEYS[i + 1]
  if code == 'g' then
    charge_tat(key, extra, limit, now)
  elseif code == 'c' then
    if redis.call('ZSCORE', key, lease_id) then
      redis.call('ZADD', key, 'XX', int(now + ttl), lease_id)
      redis.call('PEXPIRE', key, ceil_ms(ttl + 1000000))
    end
  elseif arg > now then
    charge_budget(key, extra, arg, now)
    if tonumber(redis.call('GET', key) or '0') > limit then ok = 0 end
  end
end
return ok
