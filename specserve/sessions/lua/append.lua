-- ARGV: ttl_ms, turn token, text, token ids...
if redis.call('EXISTS', meta) == 0 then return 'NOTFOUND' end
if not holds() then return 'BUSY' end
for i = 4, #ARGV, 1000 do
  redis.call('RPUSH', ids, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
local text = redis.call('HGET', partial, 'text') or ''
local lease = tonumber(redis.call('HGET', partial, 'lease'))
redis.call('HSET', partial, 'text', text .. ARGV[3], 'deadline', ms(now + lease))
touch()
return 'OK'
