-- Shared by every script (prepended): the keys, the TTL, the server clock, helpers.
local meta, turns, partial, ids = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function ms(x) return string.format('%.0f', x) end
-- a write: stamp the session and renew the expiry of all its keys
local function touch()
  redis.call('HSET', meta, 'updated', ms(now))
  for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ttl) end
end
-- the turn in progress joins the history; cut short with no tokens, it leaves no trace
local function finish(complete)
  local list = redis.call('LRANGE', ids, 0, -1)
  if complete or #list > 0 then
    local text = redis.call('HGET', partial, 'text') or ''
    local a = '{"role":"assistant","content":' .. cjson.encode(text) .. ',"token_ids":['
      .. table.concat(list, ',') .. '],"complete":' .. (complete and 'true' or 'false') .. '}'
    redis.call('RPUSH', turns, redis.call('HGET', partial, 'user'), a)
  end
  redis.call('DEL', partial, ids)
end
-- ARGV[2] holds the session and its lease has not expired
local function holds()
  local p = redis.call('HMGET', partial, 'turn', 'deadline')
  return p[1] == ARGV[2] and tonumber(p[2]) > now
end
local function snapshot()
  local m = redis.call('HMGET', meta, 'created', 'updated', 'replica')
  return {'OK', m[1] or '0', m[2] or '0', m[3] or '', redis.call('LRANGE', turns, 0, -1)}
end
