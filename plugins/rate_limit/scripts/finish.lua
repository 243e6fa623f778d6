-- Runs after common.lua (prepended when loaded).
-- KEYS[1] lease marker, KEYS[1+i] key of check i (TPM, concurrency and budgets),
-- KEYS[n+2] the lease's "finished" mark (kept for ARGV[7] ms: a retried release, or an
-- admission still on its way, then changes nothing).
-- ARGV: now, lease id, degraded (0/1), actual, charged, n, mark ttl (ms), then per check:
-- code, limit, arg. Returns 1, or 0 when the lease was finished already.
local now = tonumber(ARGV[1])
local lease_id = ARGV[2]
local degraded = ARGV[3] == '1'
local actual, charged = tonumber(ARGV[4]), tonumber(ARGV[5])
local n = tonumber(ARGV[6])
if redis.call('SET', KEYS[n + 2], '1', 'NX', 'PX', ARGV[7]) == false then return 0 end
local landed = redis.call('DEL', KEYS[1]) == 1
local delta = actual - charged
if degraded and not landed then delta = actual end
for i = 1, n do
  local b = 7 + (i - 1) * 3
  local code, limit, arg = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local key = KEYS[i + 1]
  if code == 'g' then
    charge_tat(key, delta, limit, now)
  elseif code == 'c' then
    redis.call('ZREM', key, lease_id)
  else
    charge_budget(key, delta, arg, now)
  end
end
return 1
