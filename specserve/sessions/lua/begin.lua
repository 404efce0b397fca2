-- ARGV: ttl_ms, turn token, lease_ms, user turn JSON
if redis.call('EXISTS', meta) == 0 then return 'NOTFOUND' end
if redis.call('EXISTS', partial) == 1 then
  if tonumber(redis.call('HGET', partial, 'deadline') or '0') > now then return 'BUSY' end
  finish(false)
end
redis.call('HSET', partial, 'turn', ARGV[2], 'deadline', ms(now + tonumber(ARGV[3])),
           'lease', ARGV[3], 'user', ARGV[4], 'text', '')
touch()
return 'OK'
