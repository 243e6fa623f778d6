-- Shared functions, prepended to admit.lua, debit.lua and finish.lua when loaded.
--
-- Times are integer microseconds. A TAT is "u:r" meaning u + r/limit microseconds, with
-- 0 <= r < limit, so that adding c * PERIOD / limit is exact integer arithmetic (every
-- intermediate stays below 2^53, where Lua's doubles are exact).
local P = 60000000
local function int(x)
  return string.format('%.0f', x)
end
local function ceil_ms(us)
  local m = math.ceil(us / 1000)
  if m < 1 then m = 1 end
  return int(m)
end
local function get_tat(key)
  local v = redis.call('GET', key)
  if not v then return nil, nil end
  local u, r = string.match(v, '^(%-?%d+):(%d+)$')
  if not u then return nil, nil end
  return tonumber(u), tonumber(r)
end
local function base_tat(key, now)
  local u, r = get_tat(key)
  if u == nil or u < now then return now, 0 end
  return u, r
end
local function shift(u, r, units, limit)
  local num = r + units * P
  return u + math.floor(num / limit), num % limit
end
local function level(u, r, now, limit)
  local remaining = math.floor(((P - (u - now)) * limit - r) / P)
  if remaining < 0 then remaining = 0 end
  if remaining > limit then remaining = limit end
  local reset = u - now
  if r > 0 then reset = reset + 1 end
  return remaining, reset
end
local function put_tat(key, u, r, now)
  if u < now or (u == now and r == 0) then
    redis.call('DEL', key)
  else
    redis.call('SET', key, string.format('%.0f:%.0f', u, r), 'PX', ceil_ms(u - now + 1000000))
  end
end
local function charge_tat(key, units, limit, now)
  if units > 0 then
    local u, r = base_tat(key, now)
    u, r = shift(u, r, units, limit)
    put_tat(key, u, r, now)
  elseif units < 0 then
    local u, r = get_tat(key)
    if u ~= nil and (u > now or (u == now and r > 0)) then
      u, r = shift(u, r, units, limit)
      put_tat(key, u, r, now)
    end
  end
end
local function charge_budget(key, units, window_end, now)
  if units == 0 or window_end <= now then return end
  if units > 0 then
    redis.call('INCRBY', key, int(units))
  elseif redis.call('EXISTS', key) == 1 then
    if redis.call('INCRBY', key, int(units)) < 0 then redis.call('SET', key, '0') end
  else
    return
  end
  redis.call('PEXPIRE', key, ceil_ms(window_end - now + 60000000))
end
