-- ARGV: ttl_ms, replica
if redis.call('EXISTS', meta) == 0 then return 'NOTFOUND' end
redis.call('HSET', meta, 'replica', ARGV[2])
touch()
return 'OK'
