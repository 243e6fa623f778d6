-- Runs after common.lua (prepended when loaded).
-- KEYS[1] lease marker, KEYS[1+i] key of check i, KEYS[n+2] the lease's "finished" mark.
-- ARGV: now, lease id, lease ttl (us), n, then per check: code, limit, cost, arg.
-- Returns {ok, then per check: status, remaining, reset_us, retry_us}; {0} for a lease
-- already finished (an admission its caller gave up on, run after its release).
local now = tonumber(ARGV[1])
local lease_id = ARGV[2]
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[n + 2]) == 1 then return {0} end
local ok = 1
local new, res = {}, {}
for i = 1, n do
  local b = 4 + (i - 1) * 4
  local code, limit = ARGV[b + 1], tonumber(ARGV[b + 2])
  local cost, arg = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local key = KEYS[i + 1]
  -- status, retry, then remaining and reset before and after taking this request
  local st, retry, rem0, reset0, rem1, reset1 = 1, 0, 0, 0, 0, 0
  if code == 'g' then
    local u, r = base_tat(key, now)
    local nu, nr = shift(u, r, cost, limit)
    rem0, reset0 = level(u, r, now, limit)
    rem1, reset1 = level(nu, nr, now, limit)
    if cost > limit then
      st = 2
    elseif nu - now > P or (nu - now == P and nr > 0) then
      st = 0
      retry = nu - P - now
      if nr > 0 then retry = retry + 1 end
    else
      new[i] = {nu, nr}
    end
  elseif code == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
    local held = redis.call('ZCARD', key)
    rem0, rem1 = math.max(0, limit - held), math.max(0, limit - held - 1)
    if held >= limit then
      st = 0
      retry = arg
    end
  else
    local used = tonumber(redis.call('GET', key) or '0')
    rem0, rem1 = math.max(0, limit - used), math.max(0, limit - used - cost)
    reset0, reset1 = arg - now, arg - now
    if cost > limit then
      st = 2
    elseif used + cost > limit then
      st = 0
      retry = arg - now
    end
  end
  if st ~= 1 then ok = 0 end
  res[i] = {st, retry, rem0, reset0, rem1, reset1}
end
local out = {ok}
for i = 1, n do
  local x = res[i]
  table.insert(out, x[1])
  if ok == 1 then
    table.insert(out, x[5])
    table.insert(out, x[6])
  else
    table.insert(out, x[3])
    table.insert(out, x[4])
  end
  table.insert(out, x[2])
end
if ok == 1 then
  for i = 1, n do
    local b = 4 + (i - 1) * 4
    local code, cost, arg = ARGV[b + 1], tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
    local key = KEYS[i + 1]
    if code == 'g' then
      put_tat(key, new[i][1], new[i][2], now)
    elseif code == 'c' then
      redis.call('ZADD', key, int(now + ttl), lease_id)
      redis.call('PEXPIRE', key, ceil_ms(ttl + 1000000))
    else
      charge_budget(key, cost, arg, now)
    end
  end
  redis.call('SET', KEYS[1], '1', 'PX', ceil_ms(ttl))
end
return out
